"""Data sets by name: cifar10, cifar100, fashion_mnist, imagenet (LMDB), synthetic.

`build_datasets` returns (train, val, info). The small data sets also offer `as_tensors()` (uint8
NCHW images, int64 labels) so that harness/loaders.py can keep them on the GPU and augment them
there in batches (gpu_loader.py); every data set is also a plain map-style Dataset for DataLoader.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from .info import DatasetInfo

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "imagenet", "synthetic")


def list_datasets() -> list[str]:
    return list(DATASETS)


def build_datasets(
    name: str, root: str | None = None, *, num_train: int = 2048, num_val: int = 512,
    image_size: int = 32, num_classes: int = 10, seed: int = 0, download: bool = False,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    if name in ("cifar10", "cifar100"):
        from .cifar import build_cifar

        return build_cifar(name, root or "datasets", download=download)
    if name == "fashion_mnist":
        from .fashion_mnist import build_fashion_mnist

        return build_fashion_mnist(root)
    if name == "synthetic":
        from .synthetic import build_synthetic

        return build_synthetic(num_train, num_val, image_size, num_classes, seed)
    if name == "imagenet":
        from .imagenet import build_imagenet

        return build_imagenet(root or "datasets/imagenet")
    raise ValueError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")


__all__ = ["DatasetInfo", "build_datasets", "list_datasets"]
