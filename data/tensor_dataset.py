"""A map-style data set over uint8 images held in memory, with the paper's small-image augmentation.

CIFAR's recipe (train_cifar10.py): RandomCrop(32, padding=4) with zero fill (CIFAR-100: reflect
fill), RandomHorizontalFlip, ToTensor, Normalize. The DataLoader path (data.on_gpu=false) applies it
here per sample; gpu_loader.TensorBatchLoader applies the same to whole batches from `as_tensors()`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .info import DatasetInfo


class ImageTensorDataset(Dataset):
    """uint8 (N, C, H, W) images and int64 labels; per-sample crop/flip when `train`."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        train: bool,
        crop_padding: int = 4,
        flip: bool = True,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.info, self.train = info, train
        self.crop_padding, self.flip = crop_padding, flip
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
        if self.train:
            p = self.crop_padding
            if p:
                h, w = x.shape[1:]
                x = F.pad(x[None], (p, p, p, p), mode=self.info.pad_mode)[0]
                i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
                x = x[:, i : i + h, j : j + w]
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(2)
        return (x - self.mean) / self.std, int(self.labels[index])


def split_pair(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    info: DatasetInfo,
) -> tuple[ImageTensorDataset, ImageTensorDataset, DatasetInfo]:
    """Both splits as data sets, and `info` completed with their sizes."""
    info = dataclasses.replace(info, num_train=len(train[0]), num_val=len(val[0]))
    return (
        ImageTensorDataset(*train, info, train=True),
        ImageTensorDataset(*val, info, train=False),
        info,
    )
