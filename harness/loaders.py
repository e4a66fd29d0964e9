"""Batches for the training loop: in-memory batches for small data sets, DataLoader workers for ImageNet.

An H100 trains a CIFAR-size ResNet-18 at about 18k img/s, far beyond what a CPU loader with per-image
transforms feeds, so the data sets that fit (CIFAR, Fashion-MNIST, synthetic) are held in memory and
augmented a whole batch at a time by data/gpu_loader.TensorBatchLoader, their one augmentation
recipe: on the device with `data.on_gpu=true`, on the CPU otherwise (the loop moves the batches).
ImageNet reads its LMDB with DataLoader workers and pinned memory. Both take each epoch's order and
shard from gpu_loader.epoch_order, a function of (seed, epoch) alone, so a resumed run sees the same
batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from data import DatasetInfo
from data.gpu_loader import TensorBatchLoader, epoch_order

from .distributed import DistInfo


class EpochShardSampler(Sampler[int]):
    """This rank's share of the epoch's order (gpu_loader.epoch_order): training shuffles and gives
    every rank the same count, evaluation covers each sample once."""

    def __init__(self, length: int, *, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to draw, and how many of its samples to leave out (a mid-epoch resume)."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        return epoch_order(self.length, train=self.shuffle, seed=self.seed, epoch=self.epoch,
                           rank=self.rank, world_size=self.world_size)[self.start:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


@dataclass
class Loaders:
    train: Any
    val: Any
    train_size: int = 0  # samples, after data.train_subset / data.val_subset
    val_size: int = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch both loaders draw; training starts at `start_batch` (a mid-epoch resume),
        without reading or augmenting the batches before it."""
        if isinstance(self.train, DataLoader):
            self.train.sampler.set_epoch(epoch, start_batch * self.train.batch_size)  # type: ignore[attr-defined]
        else:
            self.train.set_epoch(epoch, start_batch)
        target = self.val.sampler if isinstance(self.val, DataLoader) else self.val
        target.set_epoch(epoch)


def _subset(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    return Subset(ds, range(n))


def _tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(uint8 NCHW images, labels) of a data set that can live on the device, else None."""
    if isinstance(ds, Subset):
        inner = _tensors(ds.dataset)
        if inner is None:
            return None
        idx = torch.as_tensor(list(ds.indices))
        return inner[0][idx], inner[1][idx]
    as_tensors = getattr(ds, "as_tensors", None)
    return as_tensors() if as_tensors is not None else None


def build_loaders(
    train_set: Dataset, val_set: Dataset, info: DatasetInfo, data_cfg: DictConfig, batch_size: int,
    eval_batch_size: int, device: torch.device, dist: DistInfo, seed: int,
) -> Loaders:
    train_set = _subset(train_set, data_cfg.train_subset)
    val_set = _subset(val_set, data_cfg.val_subset)
    if len(train_set) // dist.world_size < batch_size:  # type: ignore[arg-type]
        raise ValueError(
            f"{info.name} has {len(train_set)} training images: too few for a batch of "  # type: ignore[arg-type]
            f"{batch_size} per process; lower trainer.batch_size or raise data.train_subset"
        )
    tensors = (_tensors(train_set), _tensors(val_set))
    if tensors[0] is not None and tensors[1] is not None:
        common = dict(
            mean=info.mean, std=info.std, device=device if data_cfg.on_gpu else torch.device("cpu"),
            rank=dist.rank, world_size=dist.world_size, seed=seed, pad_mode=info.pad_mode,
        )
        return Loaders(
            TensorBatchLoader(*tensors[0], batch_size, train=True, drop_last=True, **common),
            TensorBatchLoader(*tensors[1], eval_batch_size, train=False, drop_last=False, **common),
            len(train_set), len(val_set),  # type: ignore[arg-type]
        )
    pin = device.type == "cuda"
    workers = data_cfg.workers

    def loader(ds: Dataset, bs: int, train: bool) -> Iterable:
        sampler = EpochShardSampler(
            len(ds), shuffle=train, seed=seed, rank=dist.rank, world_size=dist.world_size,  # type: ignore[arg-type]
        )
        return DataLoader(
            ds, batch_size=bs, sampler=sampler, num_workers=workers, pin_memory=pin,
            drop_last=train, persistent_workers=workers > 0,
        )

    return Loaders(
        loader(train_set, batch_size, True), loader(val_set, eval_batch_size, False),
        len(train_set), len(val_set),  # type: ignore[arg-type]
    )
