"""CIFAR-10 and CIFAR-100 through torchvision.datasets, with the paper's normalisation.

torchvision reads the python-version archives extracted under data.root (cifar-10-batches-py/ or
cifar-100-python/) and checks every file's md5 sum first; data.download=true fetches the archive
where the network allows. When the files are missing or corrupt the error says where they were
looked for and how to get them. The augmentation (random crop with zero or reflect fill, flip) is
gpu_loader.TensorBatchLoader's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .info import DatasetInfo
from .tensor_dataset import split_pair

FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
TORCHVISION_CLASS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
CLASSES = {"cifar10": 10, "cifar100": 100}
# the paper's normalisation and crop fill: train_cifar10.py:271-283, train_cifar100.py:265-280
NORM = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "constant"),
    "cifar100": (
        (125.3 / 255, 123.0 / 255, 113.9 / 255),
        (63.0 / 255, 62.1 / 255, 66.7 / 255),
        "reflect",
    ),
}


def _split(name: str, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, 32, 32) images, int64 labels) of one split, read by torchvision."""
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_CLASS[name])
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted" (md5 check)
        raise FileNotFoundError(
            f"{name} not found or corrupt in {root / FOLDER[name]} (torchvision: {err}). Get it "
            f"with data.download=true where the network allows, or copy "
            f"https://www.cs.toronto.edu/~kriz/{ARCHIVE[name]} and extract it in {root} "
            f"(`tar -xzf {ARCHIVE[name]} -C {root}`)"
        ) from err
    except OSError as err:  # the download itself failed: no network, proxy, disk full
        raise FileNotFoundError(
            f"{name} is not in {root / FOLDER[name]} and downloading it failed ({err!r}); copy "
            f"https://www.cs.toronto.edu/~kriz/{ARCHIVE[name]} and extract it in {root}"
        ) from err
    labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < CLASSES[name]:
        raise ValueError(f"{name} in {root}: labels outside 0..{CLASSES[name] - 1}; is it the right data set?")
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), labels


def build_cifar(name: str, root: str | Path, download: bool = False) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Train and test splits of `name` ("cifar10" or "cifar100") from `root`."""
    root = Path(root)
    mean, std, pad_mode = NORM[name]
    info = DatasetInfo(name=name, num_classes=CLASSES[name], in_channels=3, image_size=32, mean=mean,
                       std=std, pad_mode=pad_mode)
    return split_pair(_split(name, root, True, download), _split(name, root, False, False), info)
