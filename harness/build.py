"""Everything a training run is made of, built once from the config: the `Run` the loop works on.

The data sets are read and the model checked against them (`build_data`) before the run folder is
touched, so a missing data set or an image size the model cannot take fails first, clearly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

import data as datasets
import division
import models
from division.plan import describe_plan

from . import distributed
from .loaders import Loaders, build_loaders
from .methods import PreparedModel, options_of, prepare
from .runlog import RunLog
from .schema import division_config
from .state import TrainState, model_input

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def enum_value(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


@dataclass
class Run:
    cfg: DictConfig
    device: torch.device
    dist: distributed.DistInfo
    run_dir: Path
    info: datasets.DatasetInfo
    loaders: Loaders
    prepared: PreparedModel
    state: TrainState
    train_model: nn.Module  # the model, or its DistributedDataParallel wrapper
    amp_dtype: torch.dtype | None
    log: RunLog
    steps_per_epoch: int
    total_steps: int
    description: dict[str, Any] = field(default_factory=dict)  # what every epoch's metrics name
    activation: tuple[int | None, int | None] | None = None  # (bytes, peak) of the first step


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=cpu")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    return torch.device("cpu")


def build_data(cfg: DictConfig) -> tuple[Dataset, Dataset, datasets.DatasetInfo]:
    """The data sets, and the model checked against their images (it can take them)."""
    d = cfg.data
    train_set, val_set, info = datasets.build_datasets(
        d.name, d.root, num_train=d.num_train, num_val=d.num_val, image_size=d.image_size,
        num_classes=d.num_classes, seed=cfg.seed, download=d.download,
    )
    models.check_image_size(cfg.model.name, info.image_size, info.in_channels, info.num_classes)
    return train_set, val_set, info


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch, as the paper; optional linear warm-up before it."""
    epochs, sched = cfg.trainer.epochs, cfg.sched
    warmup = min(sched.warmup_epochs, epochs - 1) if epochs > 1 else 0
    name = enum_value(sched.name)
    if name == "cosine":
        main: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, epochs - warmup), eta_min=sched.eta_min
        )
    elif name == "step":
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(sched.milestones), gamma=sched.gamma)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def build_state(cfg: DictConfig, info: datasets.DatasetInfo, device: torch.device) -> tuple[TrainState, PreparedModel]:
    model = models.build_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels)
    prepared = prepare(model, enum_value(cfg.method.name), division_config(cfg), options_of(cfg.method))
    model = prepared.model.to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                                weight_decay=o.weight_decay, nesterov=o.nesterov)
    scaler = torch.amp.GradScaler(device.type, enabled=enum_value(cfg.trainer.amp) == "fp16")
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg), scaler, built_for=model_input(info))
    return state, prepared


def build(
    cfg: DictConfig, device: torch.device, dist: distributed.DistInfo, run_dir: Path,
    sets: tuple[Dataset, Dataset, datasets.DatasetInfo], log: RunLog,
) -> Run:
    tr = cfg.trainer
    train_set, val_set, info = sets
    batch = tr.batch_size // dist.world_size
    loaders = build_loaders(train_set, val_set, info, cfg.data, batch, tr.eval_batch_size or batch, device,
                            dist, cfg.seed)
    state, prepared = build_state(cfg, info, device)
    train_model: nn.Module = state.model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tr.compile != "off":
        train_model = compiled(train_model, tr.compile)
    steps_per_epoch = len(loaders.train)
    total = tr.epochs * steps_per_epoch if tr.max_steps is None else min(tr.max_steps, tr.epochs * steps_per_epoch)
    amp = enum_value(tr.amp)
    description = {"method": prepared.method, "method_settings": prepared.settings, "model": cfg.model.name,
                   "data": info.name, "batch_size": tr.batch_size, "amp": amp,
                   "world_size": dist.world_size, "device": str(device), "compile": tr.compile}
    return Run(cfg, device, dist, run_dir, info, loaders, prepared, state, train_model, AMP_DTYPES.get(amp),
               log, steps_per_epoch, total, description)


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile with the default (inductor) backend; a DDP model is compiled whole, so that
    dynamo's DDP optimizer splits the graph at gradient buckets. fullgraph stays off: a converted
    model compiles without a break (tests/test_compile.py), a method's hooks need not. The state
    (checkpoints, the optimizer) keeps the uncompiled module and its parameter names."""
    return torch.compile(model, mode=mode)  # type: ignore[return-value]


def describe(run: Run) -> str:
    """The run's first log line."""
    cfg, tr = run.cfg, run.cfg.trainer
    n_params = sum(p.numel() for p in run.state.model.parameters())
    dcfg = division_config(cfg)
    method = run.prepared.method
    return (
        f"{cfg.experiment_name}: {cfg.model.name} ({n_params / 1e6:.2f}M params) on {run.info.name} "
        f"({run.loaders.train_size} train / {run.loaders.val_size} val images), method={method}"
        + (_division_settings(dcfg) if method == "division" else "")
        + f", device={run.device}, processes={run.dist.world_size}, batch {tr.batch_size} "
        f"({tr.batch_size // run.dist.world_size} per process), amp={enum_value(tr.amp)}, "
        f"channels_last={tr.channels_last}"
        + ("" if tr.compile == "off" else f", torch.compile mode={tr.compile} (the first steps compile)")
    )


def _division_settings(dcfg: division.DivisionConfig) -> str:
    plan = describe_plan(dcfg.layer_bits, dcfg.exclude)
    return f" (B={dcfg.block_size}, Q={dcfg.hfc_bits}, {dcfg.backward_mode}{'; ' + plan if plan else ''})"


def apply_determinism(cfg: DictConfig, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark and not cfg.trainer.deterministic
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
