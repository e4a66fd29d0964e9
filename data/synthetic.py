"""Learnable fake images, deterministic by seed: smoke tests and benchmarks without real data.

Each class has a smooth random prototype image (fixed by the seed); a sample is its class prototype
plus per-pixel Gaussian noise, stored as uint8 like a real data set so that the same loaders and
augmentation apply. Nearest-prototype classification is near perfect, so a model that trains at all
reaches high accuracy within an epoch or two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .info import DatasetInfo
from .tensor_dataset import split_pair

NOISE = 40.0  # pixel noise std on the 0..255 scale
COARSE = 4  # prototypes are random COARSE x COARSE images upsampled: smooth, like natural images


def prototypes(image_size: int, num_classes: int, channels: int, seed: int) -> torch.Tensor:
    """float (classes, C, H, W) class means on the 0..255 scale."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, COARSE, COARSE, generator=g)
    return (
        F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
        * 255
    )


def synthetic_images(
    count: int, image_size: int, num_classes: int, channels: int, seed: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` uint8 images and their labels; `stream` separates train (1) from val (2) noise."""
    protos = prototypes(image_size, num_classes, channels, seed)
    g = torch.Generator().manual_seed(seed * 7919 + stream)
    labels = torch.randint(0, num_classes, (count,), generator=g)
    images = protos[labels] + NOISE * torch.randn(
        count, channels, image_size, image_size, generator=g
    )
    return images.round().clamp(0, 255).to(torch.uint8), labels


def build_synthetic(
    num_train: int, num_val: int, image_size: int, num_classes: int, seed: int, channels: int = 3
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Train and val splits sharing the class prototypes of `seed`, with independent noise."""
    for name, v in (
        ("data.num_train", num_train),
        ("data.num_val", num_val),
        ("data.image_size", image_size),
        ("data.num_classes", num_classes),
        ("in_channels", channels),
    ):
        if v < 1:
            raise ValueError(
                f"{name}={v} is invalid for synthetic data: expected a positive integer"
            )
    info = DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        in_channels=channels,
        image_size=image_size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )
    return split_pair(
        synthetic_images(num_train, image_size, num_classes, channels, seed, 1),
        synthetic_images(num_val, image_size, num_classes, channels, seed, 2),
        info,
    )
