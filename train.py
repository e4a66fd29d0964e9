"""Train an image classifier with DIVISION (or a baseline method) and log accuracy, memory and speed.

One process:   python train.py experiment=resnet18_cifar10 data.root=datasets
Override:      python train.py model=resnet50 data=imagenet division.hfc_bits=4 trainer.amp=bf16
Several GPUs:  torchrun --nproc_per_node=4 train.py experiment=resnet50_imagenet \
                   hydra.run.dir=logs/runs/rn50   (trainer.batch_size is the global batch)
Sweep:         python train.py -m experiment=demo division.block_size=4,8,16 division.hfc_bits=1,2

Everything a run writes lives in its Hydra run folder (logs/runs/<experiment>/<date_time> by
default): the resolved config.yaml, train.log, metrics.jsonl (one line per epoch), status.json,
tensorboard/ and last.pt. `trainer.resume=auto` continues the run in the given folder exactly where
last.pt left it. The training itself is harness.train(cfg) (harness/run.py); this file is the
command line around it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from harness.run import train
from harness.schema import register_configs

__all__ = ["main", "train"]


def _rank_run_dir() -> str | None:
    """Under torchrun only rank 0 keeps the run folder; the others get a throw-away one, removed
    when they finish (its path, or None on rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        return None
    folder = tempfile.mkdtemp(prefix="division-rank-")
    sys.argv = [a for a in sys.argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    sys.argv += [f"hydra.run.dir={folder}", "hydra.output_subdir=null"]
    return folder


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    register_configs()
    throwaway = _rank_run_dir()

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    def run(cfg: DictConfig) -> float | None:
        result = train(cfg, HydraConfig.get().runtime.output_dir)
        return result.get("val_acc1")

    try:
        run()
    finally:
        if throwaway is not None:
            shutil.rmtree(throwaway, ignore_errors=True)


if __name__ == "__main__":
    main()
