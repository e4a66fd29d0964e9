"""CIFAR-10 and CIFAR-100 in torchvision's folder layout, with the paper's augmentation.

The python-version archives, extracted under data.root: cifar-10-batches-py/ (data_batch_1..5,
test_batch) or cifar-100-python/ (train, test). They are pickles of numpy arrays: that is the data
set's own format, read here directly (torchvision's reader insists on the archive's md5 sums).
data.download=true fetches them through torchvision when the network allows.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .info import DatasetInfo
from .tensor_dataset import split_pair

LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
TORCHVISION_CLASS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
ARCHIVE = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
# the paper's normalisation and crop fill: train_cifar10.py:271-283, train_cifar100.py:265-280
NORM = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "constant"),
    "cifar100": (
        (125.3 / 255, 123.0 / 255, 113.9 / 255),
        (63.0 / 255, 62.1 / 255, 66.7 / 255),
        "reflect",
    ),
}


def _read_batches(
    folder: Path, files: list[str], label_key: bytes, classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            label = np.asarray(batch[label_key], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
            raise ValueError(
                f"CIFAR file {path} is unreadable or corrupt ({err!r}); download it again"
            ) from err
        if len(data) != len(label):
            raise ValueError(
                f"CIFAR file {path}: {len(data)} images but {len(label)} labels; download it again"
            )
        if len(label) and not 0 <= label.min() <= label.max() < classes:
            raise ValueError(
                f"CIFAR file {path}: labels outside 0..{classes - 1}; is it the right data set?"
            )
        images.append(data)
        labels.append(label)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _download(name: str, root: Path) -> str:
    """Fetch and extract the archive through torchvision; '' on success, else why not."""
    import torchvision

    try:
        getattr(torchvision.datasets, TORCHVISION_CLASS[name])(str(root), train=True, download=True)
    except Exception as err:  # no network, proxy, disk full: report it with the manual route
        return f" (download failed: {err!r})"
    return ""


def build_cifar(
    name: str, root: str | Path, download: bool = False
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Train and test splits of `name` from `root`/cifar-10-batches-py (or cifar-100-python)."""
    folder_name, train_files, test_files, label_key, classes = LAYOUT[name]
    root = Path(root)
    folder = root / folder_name
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    failure = ""
    if missing and download:
        failure = _download(name, root)
        missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: {folder} lacks {', '.join(missing)}{failure}. Get it with "
            f'data.download=true where the network allows, or `python -c "import torchvision; '
            f"torchvision.datasets.{TORCHVISION_CLASS[name]}('{root}', download=True)\"`, or copy "
            f"https://www.cs.toronto.edu/~kriz/{ARCHIVE[name]} and extract it in {root} "
            f"(`tar -xzf {ARCHIVE[name]} -C {root}`)"
        )
    mean, std, pad_mode = NORM[name]
    info = DatasetInfo(
        name=name,
        num_classes=classes,
        in_channels=3,
        image_size=32,
        mean=mean,
        std=std,
        pad_mode=pad_mode,
    )
    return split_pair(
        _read_batches(folder, train_files, label_key, classes),
        _read_batches(folder, test_files, label_key, classes),
        info,
    )
