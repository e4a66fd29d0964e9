"""The training state: everything a resumed run needs, saved and loaded in one place.

A TrainState holds the model, optimizer, scheduler and gradient scaler, the position in the run
(epochs done, batches done in the current epoch, optimizer steps) and the history of finished
epochs' metrics. `save` writes all of it (with every rank's RNG state and the resolved config) to
last.pt atomically; `restore` applies a checkpoint to a freshly built state, so a resumed run
continues bit for bit, mid-epoch included. `check_resume` compares a checkpoint's config with the
new one before anything is built or written: a checkpoint of another model, class count or method
is refused, and so is a changed hyperparameter, naming the keys (a run resumed under other settings
is not the run its config.yaml describes). `check_fits_data` compares what the model was built for
(classes, input channels, image size) with the data set once it is read, also before the run folder
is touched: a real data set's shape is not in the config (data.root may move on resume).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data import DatasetInfo

from . import checkpoints, distributed
from .schema import TrainConfig, flatten

# keys a resumed run may change: where things are and how much is logged, evaluated or saved,
# never what is trained or how
RESUMABLE_CHANGES = (
    "trainer.resume", "trainer.max_steps", "trainer.log_every", "trainer.max_val_steps",
    "trainer.eval_batch_size", "trainer.save_last", "trainer.save_every_steps", "trainer.device",
    "trainer.compare_with_vanilla", "trainer.compile", "data.root", "data.workers", "data.download", "data.on_gpu",
    "experiment_name",
)


@dataclass
class Position:
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches done in epoch `epoch` (mid-epoch checkpoints)
    step: int = 0  # optimizer steps done


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    position: Position = field(default_factory=Position)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    # (samples, loss sum, correct) of the current epoch's batches done, all processes: mid-epoch saves
    epoch_totals: list[float] = field(default_factory=lambda: [0.0] * 3)
    built_for: dict[str, int] = field(default_factory=dict)  # model_input() of the data it was built for

    def save(self, path: Path, cfg: DictConfig, dist: distributed.DistInfo) -> None:
        """Collective (every rank gives its RNG state); rank 0 writes."""
        rngs = gather_rng(dist)
        if not dist.is_main:
            return
        checkpoints.save_atomic(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "epoch": self.position.epoch,
                "batch_in_epoch": self.position.batch,
                "step": self.position.step,
                "history": self.history,
                "epoch_totals": self.epoch_totals,
                "rng": rngs,
                "config": OmegaConf.to_container(cfg, resolve=True),
                "built_for": self.built_for,
            },
            path,
        )

    def restore(self, ckpt: dict[str, Any], dist: distributed.DistInfo) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.position = Position(ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"])
        self.history = list(ckpt["history"])
        self.epoch_totals = list(ckpt["epoch_totals"])
        rng = ckpt["rng"]
        set_rng_state(rng[dist.rank] if isinstance(rng, list) else rng)


def schema_defaults() -> dict[str, Any]:
    """Every typed key's default (harness/schema.py), flattened as check_resume compares them."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=True))


def check_resume(ckpt: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Refuse a checkpoint that does not belong to this config, naming what differs."""
    # a key the harness has gained since the checkpoint was written counts as its default there
    saved = {**schema_defaults(), **flatten(ckpt["config"])}
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(
        k for k in set(saved) | set(now)
        if k not in RESUMABLE_CHANGES and saved.get(k, "<absent>") != now.get(k, "<absent>")
    )
    if changed:
        listed = "; ".join(f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in changed)
        raise ValueError(
            f"trainer.resume: {path} was written by another configuration ({listed}). A resumed "
            "run continues the run its config.yaml describes: resume with the same settings, or "
            "start a new run (another hydra.run.dir) without trainer.resume. Only "
            + ", ".join(RESUMABLE_CHANGES) + " may change on resume."
        )


def model_input(info: DatasetInfo) -> dict[str, int]:
    """What a model is built for: the data set's class count, input channels and image size."""
    return {"num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": info.image_size}


def check_fits_data(ckpt: dict[str, Any], info: DatasetInfo, path: Path) -> None:
    """Refuse a checkpoint whose model was built for data of another shape, naming each difference
    (a real data set's class count is not in the config: another data.root can change it)."""
    saved, now = ckpt["built_for"], model_input(info)
    if saved is None:  # a version-2 checkpoint does not say
        return
    changed = [f"{key} {saved.get(key)} -> {value}" for key, value in now.items() if saved.get(key) != value]
    if changed:
        raise ValueError(
            f"trainer.resume: {path} holds a model built for other data than {info.name} here "
            f"({'; '.join(changed)}). Resume with the data the run started on (data.root), or start "
            "a new run (another hydra.run.dir) without trainer.resume."
        )


def load_for_resume(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint trainer.resume names, checked against cfg; None when not resuming."""
    if not cfg.trainer.resume:
        return None
    path = run_dir / "last.pt" if cfg.trainer.resume == "auto" else Path(cfg.trainer.resume)
    ckpt = checkpoints.load(path)  # a missing or corrupt file fails here
    check_resume(ckpt, cfg, path)
    return ckpt, path


# ---- random number generators ------------------------------------------------------------------


def seed_host_generators(seed: int) -> None:
    """torch's CPU, Python's and numpy's global generators (not CUDA's: a DataLoader worker seeds
    each sample's transform with this, see loaders.SeededSamples)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def seed_everything(seed: int) -> None:
    seed_host_generators(seed)
    torch.manual_seed(seed)  # the accelerators' generators too


def host_rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_host_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def rng_state() -> dict[str, Any]:
    state = host_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    set_host_rng_state(state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(dist: distributed.DistInfo) -> Any:
    """Each process's RNG state, so a resumed DDP run draws the same numbers on every rank."""
    state = rng_state()
    if not dist.enabled:
        return state
    import torch.distributed as tdist

    gathered: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, state)
    return gathered
