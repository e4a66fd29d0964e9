"""Train an image classifier with DIVISION (or a baseline method) and log accuracy, memory and speed.

One process:   python train.py experiment=resnet18_cifar10 data.root=datasets
Override:      python train.py model=resnet50 data=imagenet division.hfc_bits=4 trainer.amp=bf16
Several GPUs:  torchrun --nproc_per_node=4 --log-dir=logs/runs/rn50/torchrun train.py \
                   experiment=resnet50_imagenet hydra.run.dir=logs/runs/rn50
               (trainer.batch_size is the global batch; --log-dir keeps torchrun's per-rank error
               files in the run folder instead of a torchelastic_* folder left in /tmp)
Sweep:         python train.py -m experiment=demo division.block_size=4,8,16 division.hfc_bits=1,2

Everything a run writes lives in its Hydra run folder (logs/runs/<experiment>/<date_time> by
default): the resolved config.yaml, the command line's overrides.yaml, train.log, metrics.jsonl (one line per epoch), status.json,
tensorboard/ and last.pt. `trainer.resume=auto` continues the run in the given folder exactly where
last.pt left it. The training itself is harness.train(cfg) (harness/run.py); this file is the
command line around it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from harness.run import train
from harness.schema import register_configs

__all__ = ["main", "train"]


def _rank_run_dir() -> str | None:
    """Under torchrun only rank 0 keeps the run folder; the others get a throw-away one, removed
    when they finish (its path, or None on rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        return None
    folder = tempfile.mkdtemp(prefix="division-rank-")
    sys.argv = [a for a in sys.argv if not a.startswith("hydra.run.dir=")]
    sys.argv += [f"hydra.run.dir={folder}"]
    return folder


def _remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run folder before the config is checked; a run that failed its checks
    leaves no empty folder behind."""
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    register_configs()
    throwaway = _rank_run_dir()

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    def run(cfg: DictConfig) -> float | None:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            result = train(cfg, run_dir, overrides=list(hydra_cfg.overrides.task))
        except BaseException:
            _remove_if_empty(run_dir)
            raise
        return result.get("val_acc1")

    try:
        run()
    finally:
        if throwaway is not None:
            shutil.rmtree(throwaway, ignore_errors=True)


if __name__ == "__main__":
    main()
