"""Batches for the training loop: in-memory batches for small data sets, DataLoader workers for ImageNet.

An H100 trains a CIFAR-size ResNet-18 at about 18k img/s, far beyond what a CPU loader with per-image
transforms feeds, so the data sets that fit (CIFAR, Fashion-MNIST, synthetic) are held in memory and
augmented a whole batch at a time by data/gpu_loader.TensorBatchLoader, their one augmentation
recipe: on the device with `data.on_gpu=true`, on the CPU otherwise (the loop moves the batches).
ImageNet reads its LMDB with DataLoader workers and pinned memory. Both take each epoch's order and
shard from gpu_loader.epoch_order, a function of (seed, epoch) alone, so a resumed run sees the same
batches. On the DataLoader path each sample's random transform draws from generators seeded with
gpu_loader.sample_seed(seed, epoch, index), whichever worker (or the main process) builds it, and
the worker seeds the DataLoader draws as an epoch starts come from its own generator seeded from
(seed, epoch): starting an epoch never touches the global generators that DIVISION and dropout draw
from, so a run resumed mid-epoch continues bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from data import DatasetInfo
from data.gpu_loader import TensorBatchLoader, epoch_order, epoch_seed, sample_seed

from .distributed import DistInfo
from .state import host_rng_state, seed_host_generators, set_host_rng_state


class EpochShardSampler(Sampler[tuple[int, int]]):
    """This rank's share of the epoch's order (gpu_loader.epoch_order): training shuffles and gives
    every rank the same count, evaluation covers each sample once. Yields (sample index, the seed
    of its augmentation), the keys SeededSamples reads."""

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

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in self._indices()])

    def __len__(self) -> int:
        return len(self._indices())


@contextlib.contextmanager
def seeded_global_generators(seed: int) -> Iterator[None]:
    """torch's CPU, Python's and numpy's global generators seeded with `seed` inside (what
    torchvision and other per-sample transforms draw from), and put back as they were after."""
    saved = host_rng_state()
    seed_host_generators(seed)
    try:
        yield
    finally:
        set_host_rng_state(saved)


class SeededSamples(Dataset):
    """`dataset` read at EpochShardSampler's (index, seed) keys: each sample's transform draws from
    generators seeded with its own seed, so its augmentation is a function of (seed, epoch, index)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with seeded_global_generators(seed):
            return self.dataset[index]


def _set_epoch(loader: Any, epoch: int, start_batch: int = 0) -> None:
    if not isinstance(loader, DataLoader):
        loader.set_epoch(epoch, start_batch)
        return
    sampler: EpochShardSampler = loader.sampler  # type: ignore[assignment]
    sampler.set_epoch(epoch, start_batch * loader.batch_size)  # type: ignore[operator]  # batch_size: int | None
    # the worker seeds a DataLoader draws as iteration starts: from here, not the global generator
    loader.generator.manual_seed(epoch_seed(sampler.seed, epoch))


@dataclass
class Loaders:
    train: Any
    val: Any
    train_size: int = 0  # samples, after data.train_subset / data.val_subset
    val_size: int = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch both loaders draw; training starts at `start_batch` (a mid-epoch resume),
        without reading or augmenting the batches before it."""
        _set_epoch(self.train, epoch, start_batch)
        _set_epoch(self.val, epoch)


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


def sample_loader(
    ds: Dataset, batch_size: int, *, train: bool, seed: int, dist: DistInfo, workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over per-sample transforms (ImageNet's path): this rank's share of the epoch's
    order, each sample augmented from its own seed, workers seeded from (seed, epoch)."""
    sampler = EpochShardSampler(len(ds), shuffle=train, seed=seed, rank=dist.rank,  # type: ignore[arg-type]
                                world_size=dist.world_size)
    return DataLoader(
        SeededSamples(ds), batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=train, persistent_workers=workers > 0, generator=torch.Generator(),
    )


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
    workers, pin = data_cfg.workers, device.type == "cuda"
    return Loaders(
        sample_loader(train_set, batch_size, train=True, seed=seed, dist=dist, workers=workers, pin_memory=pin),
        sample_loader(val_set, eval_batch_size, train=False, seed=seed, dist=dist, workers=workers, pin_memory=pin),
        len(train_set), len(val_set),  # type: ignore[arg-type]
    )
