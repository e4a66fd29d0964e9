"""Learnable fake images, deterministic by seed: smoke tests and benchmarks without real data.

Each class has a smooth random prototype image; a sample is its class prototype plus pixel noise,
stored as uint8 like a real data set so that the same loaders and augmentation apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .info import DatasetInfo
from .tensor_dataset import ImageTensorDataset

NOISE = 40.0  # pixel noise std on the 0..255 scale


def synthetic_images(count: int, image_size: int, num_classes: int, channels: int, seed: int,
                     stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    protos_g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=protos_g)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False) * 255
    g = torch.Generator().manual_seed(seed * 7919 + stream)
    labels = torch.randint(0, num_classes, (count,), generator=g)
    images = protos[labels] + NOISE * torch.randn(count, channels, image_size, image_size, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


def build_synthetic(num_train: int, num_val: int, image_size: int, num_classes: int, seed: int,
                    channels: int = 3) -> tuple[Dataset, Dataset, DatasetInfo]:
    for name, v in (("data.num_train", num_train), ("data.num_val", num_val),
                    ("data.image_size", image_size), ("data.num_classes", num_classes)):
        if v < 1:
            raise ValueError(f"{name}={v} is invalid for synthetic data: expected a positive integer")
    info = DatasetInfo("synthetic", num_classes, channels, image_size, (0.5,) * channels, (0.25,) * channels)
    train = ImageTensorDataset(*synthetic_images(num_train, image_size, num_classes, channels, seed, 1), info, train=True)
    val = ImageTensorDataset(*synthetic_images(num_val, image_size, num_classes, channels, seed, 2), info, train=False)
    return train, val, info
