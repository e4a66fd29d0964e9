"""Batches from a data set held in memory (on the GPU or the CPU), augmented a whole batch at a time:
the one augmentation recipe of the small data sets (CIFAR, Fashion-MNIST, synthetic).

A CIFAR-size ResNet-18 trains at about 18k img/s on an H100; a CPU loader with per-image transforms
cannot feed that. Small data sets (CIFAR: 150 MB as uint8) fit on the GPU, so this loader keeps them
there, padded once for the random crop (zero or reflect fill), and builds each batch with one
gather: the crop offsets and horizontal flips are folded into the row and column indices read from
the uint8 images, which are then converted to float and normalised; no per-image Python. All
randomness comes from a generator seeded by (seed, epoch), drawn for the whole epoch up front, so an
epoch's batches are the same whatever happened before (exact resume) and on every device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's randomness: everything a loader draws is a function of (seed, epoch)."""
    return seed * 1_000_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The one source of an epoch's randomness (order, crops, flips): a function of (seed, epoch)."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s augmentation in `epoch` on the DataLoader path (per-sample
    transforms), so it does not depend on which worker builds the sample or on a resume.

    32 bits, as torch's CPU generator and numpy keep no more of a seed; an odd multiplier keeps a
    sample's seeds distinct from epoch to epoch.
    """
    return (epoch_seed(seed, epoch) * 2_654_435_761 + index) % 2**32


def epoch_order(
    n: int, *, train: bool, seed: int, epoch: int, rank: int, world_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """This rank's sample ids for an epoch, in order: both loaders take them from here.

    Training: a permutation drawn from (seed, epoch), cut to a multiple of world_size so every rank
    runs the same number of steps. Evaluation: every sample once, in order. Ranks take every
    world_size-th id, so they see disjoint samples.
    """
    if train:
        g = generator if generator is not None else epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=g)[: n // world_size * world_size]
    else:
        order = torch.arange(n)
    return order[rank::world_size]


class TensorBatchLoader:
    """Shuffled (train) or in-order (eval) batches (float32 NCHW, int64 labels) on `device`.

    Sharding: with `world_size` > 1 each rank takes every world_size-th sample of the epoch's order,
    so ranks see disjoint samples. Training keeps n // world_size samples per rank (equal step
    counts, the rest of the permutation is dropped that epoch); evaluation covers every sample once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        crop_padding: int = 4,
        flip: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                "TensorBatchLoader wants uint8 (N, C, H, W) images, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        n, c, h, w = images.shape
        if labels.shape != (n,):
            raise ValueError(f"labels of shape {tuple(labels.shape)} for {n} images")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside 0..world_size-1 (world_size={world_size})")
        if len(mean) != c or len(std) != c:
            raise ValueError(
                f"mean {tuple(mean)} and std {tuple(std)} need one value per channel ({c})"
            )
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode={pad_mode!r}: expected 'constant' or 'reflect'")
        if crop_padding < 0 or (pad_mode == "reflect" and crop_padding >= min(h, w)):
            raise ValueError(
                f"crop_padding={crop_padding} is invalid for {h}x{w} images ({pad_mode} fill)"
            )
        self.device = torch.device(device)
        self.num_samples, self.image_shape = n, (c, h, w)
        self.batch_size, self.train = batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.crop_padding = p = crop_padding if train else 0
        self.flip, self.pad_mode = flip and train, pad_mode
        if p:  # padded once up front (CIFAR: 240 MB instead of 150 MB), so that a batch is one
            images = F.pad(images, (p, p, p, p), mode=pad_mode)  # gather with indices in range
        self.images = images.to(self.device)
        self.labels = labels.long().to(self.device)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std_t), -mean_t / std_t  # (x / 255 - mean) / std
        self.channels = torch.arange(c, device=self.device).view(1, c, 1, 1)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Pick the epoch whose order, crops and flips the next iteration uses, and the batch it
        starts from (a run resumed mid-epoch: the batches before it are not built at all)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _local_count(self) -> int:
        n = self.num_samples
        if self.train:  # equal shares: every rank runs the same number of steps
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self._local_count()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample ids in order, their crop offsets and flips, on the device."""
        n = self.num_samples
        g = epoch_generator(self.seed, self.epoch)
        local = epoch_order(n, train=self.train, seed=self.seed, epoch=self.epoch, rank=self.rank,
                            world_size=self.world_size, generator=g)
        # drawn per sample id, so a sample's augmentation does not depend on the rank count
        offsets = (
            torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g)
            if self.crop_padding
            else None
        )
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        offsets = None if offsets is None else offsets[local].to(self.device)
        flips = None if flips is None else flips[local].to(self.device)
        return local.to(self.device), offsets, flips

    def augment(
        self, ids: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Normalised float32 batch of `ids`, cropped at `offsets` (B, 2) and flipped at `flips`.

        `offsets` are the crop's top-left corner in the padded image, in 0..2 * crop_padding.
        """
        b = len(ids)
        _, h, w = self.image_shape
        rows = torch.arange(h, device=self.device).expand(b, h)
        cols = torch.arange(w, device=self.device).expand(b, w)
        if flips is not None:  # crop then flip: output column j reads crop column w - 1 - j
            cols = torch.where(flips[:, None], w - 1 - cols, cols)
        if offsets is not None:
            rows = rows + offsets[:, :1]
            cols = cols + offsets[:, 1:]
        x = self.images[
            ids.view(b, 1, 1, 1), self.channels, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)
        ]
        return x.float().mul_(self.scale).add_(self.shift)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        local, offsets, flips = self._plan()
        for i in range(self.start_batch, len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            ids = local[sl]
            # built in the yield itself: a local would keep the batch alive while the step runs
            # (harness.loop.Batch frees it before backward)
            yield (self.augment(ids, None if offsets is None else offsets[sl], None if flips is None else flips[sl]),
                   self.labels[ids])
