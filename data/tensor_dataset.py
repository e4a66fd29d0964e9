"""A map-style data set over uint8 images held in memory: the small data sets' container.

It holds the images and labels for gpu_loader.TensorBatchLoader (`as_tensors()`), which applies the
paper's small-image training augmentation to whole batches: RandomCrop(32, padding=4) with zero
fill (CIFAR-100: reflect fill) and RandomHorizontalFlip (train_cifar10.py). Indexing gives a
normalised, un-augmented sample, for inspection and evaluation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from .info import DatasetInfo


class ImageTensorDataset(Dataset):
    """uint8 (N, C, H, W) images and int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.info = images, labels.long(), info
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 (N, C, H, W) images, int64 labels): the input of TensorBatchLoader."""
        return self.images, self.labels

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (N, H, W, C) images, int64 labels): numpy views, torchvision's `.data` layout."""
        return self.images.permute(0, 2, 3, 1).numpy(), self.labels.numpy()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255)
        return (x - self.mean) / self.std, int(self.labels[index])


def split_pair(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    info: DatasetInfo,
) -> tuple[ImageTensorDataset, ImageTensorDataset, DatasetInfo]:
    """Both splits as data sets, and `info` completed with their sizes."""
    info = dataclasses.replace(info, num_train=len(train[0]), num_val=len(val[0]))
    return ImageTensorDataset(*train, info), ImageTensorDataset(*val, info), info
