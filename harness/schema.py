"""The training configuration as typed dataclasses, registered with Hydra's ConfigStore.

`configs/train.yaml` starts from `train_schema`, so every key a YAML file or an override sets is
checked against these fields when the config is composed: an unknown key or a value of the wrong
type stops the run before anything starts. The `division` section is generated from
division.DivisionConfig (its fields, types and defaults: one source), the `method` group from the
method registry (harness/methods.py). Ranges Hydra cannot express are checked by `validate`, which
train() calls before it touches data, model or run folder.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import division

from .methods import method_names, options_of

# trainer.compile: off, or a torch.compile mode
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Amp(str, Enum):
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class Schedule(str, Enum):
    cosine = "cosine"
    step = "step"
    constant = "constant"


@dataclass
class ModelConfig:
    # models.list_models(), any torchvision classification model, or torchvision.NAME
    name: str = "resnet18"


@dataclass
class DataConfig:
    name: str = "synthetic"  # cifar10 | cifar100 | fashion_mnist | imagenet | synthetic
    root: str | None = None  # an explicit root must hold the data: no fallback elsewhere
    download: bool = False  # CIFAR only: fetch from the internet when the folder is empty
    on_gpu: bool = True  # small data sets: keep them on the device, augment there in batches
    workers: int = 4  # DataLoader workers per process (ImageNet)
    train_subset: int | None = None  # first N training images only (CPU demos)
    val_subset: int | None = None
    # the synthetic data's shape (default 32 px, 10 classes); for a real data set, must agree with it
    image_size: int | None = None
    num_classes: int | None = None
    num_train: int = 2048  # synthetic only
    num_val: int = 512


@dataclass
class MethodConfig:
    name: str = "division"  # harness.methods.method_names()
    # actnn: bits and group size of the per-group quantization (ActNN's 2-bit default)
    actnn_bits: int = 2
    actnn_group_size: int = 256
    # swap: pin the host copies (faster transfers, more host memory)
    swap_pin_memory: bool = True


def _section_of(config_class: type) -> type:
    """A mutable dataclass with `config_class`'s fields, types and defaults (Hydra cannot fill a
    frozen one), so the `division` section never drifts from the library's config."""
    hints = typing.get_type_hints(config_class)
    return make_dataclass("DivisionSection", [_section_field(f.name, hints[f.name], f.default) for f in fields(config_class)])


def _section_field(name: str, hint: typing.Any, default: typing.Any) -> tuple[str, typing.Any, typing.Any]:
    """A config field as Hydra types it: the library's tuples of patterns and of (pattern, Q) pairs
    are a list (`division.exclude=[conv1,fc]`) and a mapping (`division.layer_bits={layer4:4}`)."""
    if hint == tuple[str, ...]:
        return name, list[str], field(default_factory=lambda: list(default))
    if hint == tuple[tuple[str, int], ...]:
        return name, dict[str, int], field(default_factory=lambda: dict(default))
    return name, hint, field(default=default)


DivisionSection = _section_of(division.DivisionConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every parameter, BN and biases included, as the paper
    nesterov: bool = False


@dataclass
class SchedConfig:
    name: Schedule = Schedule.cosine  # stepped once per epoch, as the paper
    eta_min: float = 0.0
    warmup_epochs: int = 0  # linear warm-up from lr/(warmup_epochs+1); the paper uses none
    milestones: list[int] = field(default_factory=list)  # step schedule
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests, benchmarks)
    batch_size: int = 256  # global batch: divided by the number of processes under torchrun
    eval_batch_size: int | None = None  # defaults to batch_size
    max_val_steps: int | None = None  # evaluate on this many batches only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Amp = Amp.off
    channels_last: bool = False
    resume: str | None = None  # PATH to a checkpoint, or "auto" for this run folder's last.pt
    cudnn_benchmark: bool = True
    deterministic: bool = False
    log_every: int = 50  # TensorBoard step scalars every N steps
    save_last: bool = True  # write last.pt after every epoch (what trainer.resume continues)
    save_every_steps: int | None = None  # also every N steps, so a kill loses at most N steps
    compare_with_vanilla: bool = False  # at the end: activation memory and img/s of the same model unconverted
    # torch.compile the model (COMPILE_MODES): off, or a mode; reduce-overhead replays CUDA graphs,
    # which takes the host's time per op out of a step
    compile: str = "off"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    division: DivisionSection = field(default_factory=DivisionSection)  # type: ignore[valid-type]
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    experiment_name: str = "default"


def flatten(tree: typing.Any, prefix: str = "") -> dict[str, typing.Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings as dotted keys (checkpoint checks, summaries)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, typing.Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def register_configs() -> None:
    cs = ConfigStore.instance()
    schema = OmegaConf.structured(TrainConfig)
    OmegaConf.set_struct(schema.division.layer_bits, False)  # its keys are the user's patterns
    cs.store(name="train_schema", node=schema)
    for name in method_names():  # `method=NAME` for every registered method
        cs.store(group="method", name=name, node=MethodConfig(name=name))


def division_config(cfg: DictConfig) -> division.DivisionConfig:
    """The library's config from the `division` section (its validation applies)."""
    return division.DivisionConfig(**OmegaConf.to_container(cfg.division, resolve=True))  # type: ignore[arg-type]


def _positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive number")


def _not_negative(name: str, value: int | float) -> None:
    if value < 0:
        raise ValueError(f"{name}={value!r} is invalid: expected zero or more")


def validate(cfg: DictConfig) -> None:
    """Range checks Hydra's types cannot express; raises ValueError naming key, value and fix."""
    division_config(cfg)
    if cfg.method.name not in method_names():
        raise ValueError(f"method.name={cfg.method.name!r} is invalid: expected one of {', '.join(method_names())}")
    tr = cfg.trainer
    for key in ("epochs", "batch_size", "log_every"):
        _positive(f"trainer.{key}", tr[key])
    for key in ("max_steps", "eval_batch_size", "max_val_steps", "save_every_steps"):
        _positive(f"trainer.{key}", tr[key], allow_none=True)
    for key in ("train_subset", "val_subset", "image_size", "num_classes"):
        _positive(f"data.{key}", cfg.data[key], allow_none=True)
    _positive("data.num_train", cfg.data.num_train)
    _positive("data.num_val", cfg.data.num_val)
    _not_negative("data.workers", cfg.data.workers)
    _positive("optim.lr", cfg.optim.lr)
    _not_negative("optim.momentum", cfg.optim.momentum)
    _not_negative("optim.weight_decay", cfg.optim.weight_decay)
    _not_negative("sched.warmup_epochs", cfg.sched.warmup_epochs)
    _not_negative("sched.eta_min", cfg.sched.eta_min)
    if cfg.optim.name != "sgd":
        raise ValueError(f"optim.name={cfg.optim.name!r} is invalid: only 'sgd' (the paper's) is implemented")
    if tr.compile not in COMPILE_MODES:
        raise ValueError(f"trainer.compile={tr.compile!r} is invalid: expected one of {', '.join(COMPILE_MODES)}")
    device = tr.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"trainer.device={device!r} is invalid: expected auto, cpu, cuda or cuda:N")
    opts = options_of(cfg.method)
    if opts.actnn_bits not in (1, 2, 4, 8):
        raise ValueError(f"method.actnn_bits={opts.actnn_bits} is invalid: expected 1, 2, 4 or 8")
    _positive("method.actnn_group_size", opts.actnn_group_size)
