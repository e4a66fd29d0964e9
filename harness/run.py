"""train(cfg): one training run from a composed config, apart from the Hydra entry point (train.py),
so that tests, benchmarks and notebooks call it directly (lightning-hydra-template's shape).

What can fail without training does so before the run folder is touched: the config's values, a
checkpoint that does not belong to this config or whose model was built for data of another
shape (class count, channels, image size), a missing data set, an image size the model cannot
take, a batch that does not divide among the processes.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import distributed
from .build import apply_determinism, build, build_data, describe, resolve_device
from .compare import compare_with_vanilla
from .loop import fit
from .runlog import RunLog, remove_stale_temporaries
from .schema import validate
from .state import check_fits_data, load_for_resume, seed_everything


def default_run_dir(cfg: DictConfig) -> Path:
    """Where Hydra's default would put it: logs/runs/<experiment>/<date_time>."""
    return Path("logs/runs") / cfg.experiment_name / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def train(cfg: DictConfig, run_dir: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the configured training; returns the last epoch's metrics and the run folder.

    `overrides` (the command line's, from train.py) are kept in the run folder's overrides.yaml.
    """
    validate(cfg)
    launched = distributed.launched_by_torchrun()
    device = resolve_device(cfg.trainer.device, int(os.environ.get("LOCAL_RANK", 0)) if launched else 0)
    dist = distributed.setup(device.type)
    log: RunLog | None = None
    try:
        run_dir = Path(distributed.broadcast_object(str(Path(run_dir or default_run_dir(cfg)).resolve()), dist))  # type: ignore[arg-type]
        if cfg.trainer.batch_size % dist.world_size:
            raise ValueError(
                f"trainer.batch_size={cfg.trainer.batch_size} is the global batch and must divide evenly "
                f"among {dist.world_size} processes"
            )
        resume = load_for_resume(cfg, run_dir)
        sets = build_data(cfg)
        if resume is not None:
            check_fits_data(resume[0], sets[2], resume[1])
        if dist.is_main:  # nothing above wrote anything
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(run_dir)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            if overrides is not None:
                OmegaConf.save(OmegaConf.create(overrides), run_dir / "overrides.yaml")
        log = RunLog(run_dir, dist)
        log.status("running")
        apply_determinism(cfg, device)
        seed_everything(cfg.seed)
        run = build(cfg, device, dist, run_dir, sets, log)
        if resume is not None:
            ckpt, path = resume
            run.state.restore(ckpt, dist)
            # an epoch a max_steps stop left unfinished is trained on, and reported, anew
            run.state.history = [m for m in run.state.history if m["epoch_complete"]]
            log.metrics_file(run.state.history)
            log.info(f"resuming from {path} (epoch {run.state.position.epoch}, step {run.state.position.step})")
        log.info(describe(run))
        log.info(f"run folder: {run_dir}")
        metrics = fit(run)
        if cfg.trainer.compare_with_vanilla:
            metrics = {**metrics, "comparison": compare_with_vanilla(run)}
        log.status("finished", epoch=metrics.get("epoch"), step=run.state.position.step)
        return {**metrics, "run_dir": str(run_dir)}
    except BaseException as err:
        if log is not None:
            log.status("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if log is not None:
            log.close()
        distributed.teardown()
