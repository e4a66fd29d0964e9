"""Data sets by name: cifar10, cifar100, fashion_mnist, imagenet (LMDB), synthetic.

`build_datasets` returns (train, val, info). The small data sets also offer `as_tensors()` (uint8
NCHW images, int64 labels) so that harness/loaders.py can keep them on the device and augment them
there a batch at a time (gpu_loader.TensorBatchLoader); every data set is also a plain map-style
Dataset for DataLoader workers. Importing this package does not import torch, so that
`python data/folder2lmdb.py` runs on a machine with only lmdb, Pillow and tqdm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .info import DatasetInfo

if TYPE_CHECKING:
    from torch.utils.data import Dataset

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "imagenet", "synthetic")


def list_datasets() -> list[str]:
    """The names `build_datasets` accepts."""
    return list(DATASETS)


def build_datasets(
    name: str,
    root: str | None = None,
    *,
    num_train: int = 2048,
    num_val: int = 512,
    image_size: int | None = None,
    num_classes: int | None = None,
    in_channels: int = 3,
    seed: int = 0,
    download: bool = False,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train set, validation set, info) of data set `name` found under `root`.

    `root`: CIFAR's parent folder of cifar-10-batches-py/ (default ./datasets), Fashion-MNIST's IDX
    folder (default /usr/share/datasets/fashion-mnist), ImageNet's folder of train.lmdb and val.lmdb
    (default ./datasets/imagenet); an explicit root must hold the data (no fallback elsewhere).
    `num_train`, `num_val`, `in_channels` and `seed` shape the synthetic data only; `image_size` and
    `num_classes` shape it (default 32 and 10) and, for a real data set, must agree with it when
    given. `download` lets CIFAR fetch its archive through torchvision.
    """
    if name == "synthetic":
        from .synthetic import build_synthetic

        return build_synthetic(num_train, num_val, image_size or 32, num_classes or 10, seed, in_channels)
    if name in ("cifar10", "cifar100"):
        from .cifar import build_cifar

        sets = build_cifar(name, root or "datasets", download=download)
    elif name == "fashion_mnist":
        from .fashion_mnist import build_fashion_mnist

        sets = build_fashion_mnist(root)
    elif name == "imagenet":
        from .imagenet import build_imagenet

        sets = build_imagenet(root or "datasets/imagenet")
    else:
        raise ValueError(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    info = sets[2]
    for key, given, actual in (("num_classes", num_classes, info.num_classes), ("image_size", image_size, info.image_size)):
        if given is not None and given != actual:
            raise ValueError(
                f"data.{key}={given} contradicts {name}, which has {actual}; leave data.{key} unset "
                "for a real data set (it shapes the synthetic one)"
            )
    return sets


__all__ = ["DATASETS", "DatasetInfo", "build_datasets", "list_datasets"]
