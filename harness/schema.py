"""The training configuration as typed dataclasses, registered with Hydra's ConfigStore.

`configs/train.yaml` starts from `train_schema`, so every key a YAML file or an override sets is
checked against these fields when the config is composed: an unknown key or a value of the wrong
type stops the run before anything starts. Choices among names are Enums (Hydra lists the valid
ones in its error); ranges Hydra cannot express are checked by `validate` as train() starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import division


class Method(str, Enum):
    vanilla = "vanilla"
    division = "division"
    checkpoint = "checkpoint"
    swap = "swap"
    actnn = "actnn"


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
    name: str = "resnet18"  # models.list_models() or any torchvision classification model


@dataclass
class DataConfig:
    name: str = "synthetic"  # cifar10 | cifar100 | fashion_mnist | imagenet | synthetic
    root: str | None = None
    download: bool = False  # CIFAR only: fetch from the internet when the folder is empty
    on_gpu: bool = True  # small data sets: keep them on the device, augment there in batches
    workers: int = 4  # DataLoader workers per process (ImageNet, or on_gpu=false)
    train_subset: int | None = None  # first N training images only (CPU demos)
    val_subset: int | None = None
    # synthetic data only
    num_train: int = 2048
    num_val: int = 512
    image_size: int = 32
    num_classes: int = 10


@dataclass
class MethodConfig:
    name: Method = Method.division
    # actnn: bits and group size of the per-group quantization (ActNN's 2-bit default)
    actnn_bits: int = 2
    actnn_group_size: int = 256
    # swap: pin the host copies (faster transfers, more host memory)
    swap_pin_memory: bool = True


@dataclass
class DivisionSection:
    """Mirrors division.DivisionConfig; `python train.py division.hfc_bits=4` sets these."""

    block_size: int = 8
    hfc_bits: int = 2
    lfc_dtype: str = "bfloat16"
    backend: str = "auto"
    backward_mode: str = "division"
    compress_linear: bool = False
    share_inputs: bool = True


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
    checkpoint: bool = True  # write last.pt after every epoch and at the end


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    division: DivisionSection = field(default_factory=DivisionSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    experiment_name: str = "default"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def division_config(cfg: DictConfig) -> division.DivisionConfig:
    """The library's config from the `division` section (its validation applies)."""
    return division.DivisionConfig(**OmegaConf.to_container(cfg.division, resolve=True))  # type: ignore[arg-type]


def _positive(name: str, value: int | float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive number")


def validate(cfg: DictConfig) -> None:
    """Range checks Hydra's types cannot express; raises ValueError naming key, value and fix."""
    division_config(cfg)
    _positive("trainer.epochs", cfg.trainer.epochs)
    _positive("trainer.batch_size", cfg.trainer.batch_size)
    _positive("trainer.max_steps", cfg.trainer.max_steps, allow_none=True)
    _positive("trainer.eval_batch_size", cfg.trainer.eval_batch_size, allow_none=True)
    _positive("trainer.max_val_steps", cfg.trainer.max_val_steps, allow_none=True)
    _positive("data.train_subset", cfg.data.train_subset, allow_none=True)
    _positive("data.val_subset", cfg.data.val_subset, allow_none=True)
    _positive("optim.lr", cfg.optim.lr)
    if cfg.optim.name != "sgd":
        raise ValueError(f"optim.name={cfg.optim.name!r} is invalid: only 'sgd' (the paper's) is implemented")
    device = cfg.trainer.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"trainer.device={device!r} is invalid: expected auto, cpu, cuda or cuda:N")
    if cfg.method.actnn_bits not in (1, 2, 4, 8):
        raise ValueError(f"method.actnn_bits={cfg.method.actnn_bits} is invalid: expected 1, 2, 4 or 8")
    _positive("method.actnn_group_size", cfg.method.actnn_group_size)
