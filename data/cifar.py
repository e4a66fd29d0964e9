"""CIFAR-10 and CIFAR-100 in torchvision's folder layout, with the paper's augmentation.

The python-version archives, extracted under data.root: cifar-10-batches-py/ (data_batch_1..5,
test_batch) or cifar-100-python/ (train, test). They are pickles of numpy arrays: that is the data
set's own format. data.download=true fetches them through torchvision when the network allows.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .info import DatasetInfo
from .tensor_dataset import ImageTensorDataset

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
# the paper's normalisation (train_cifar10.py / train_cifar100.py) and crop padding
NORM = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "constant"),
    "cifar100": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255), "reflect"),
}


def _read_batches(folder: Path, files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            label = np.asarray(batch[label_key], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise ValueError(f"CIFAR file {path} is unreadable or corrupt ({err}); download it again") from err
        if len(data) != len(label):
            raise ValueError(f"CIFAR file {path}: {len(data)} images but {len(label)} labels")
        images.append(data)
        labels.append(label)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _download(name: str, root: Path) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    cls(str(root), train=True, download=True)


def build_cifar(name: str, root: str, download: bool = False) -> tuple[Dataset, Dataset, DatasetInfo]:
    folder_name, train_files, test_files, label_key, classes = LAYOUT[name]
    folder = Path(root) / folder_name
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing and download:
        _download(name, Path(root))
        missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: {folder} lacks {', '.join(missing)}. Extract the python version "
            f"(https://www.cs.toronto.edu/~kriz/{folder_name.replace('-batches-py', '').replace('-python', '')}"
            f"-python.tar.gz) into {Path(root)}, or run with data.download=true where the network allows"
        )
    mean, std, pad_mode = NORM[name]
    info = DatasetInfo(name, classes, 3, 32, mean, std, pad_mode)
    train = ImageTensorDataset(*_read_batches(folder, train_files, label_key), info, train=True)
    val = ImageTensorDataset(*_read_batches(folder, test_files, label_key), info, train=False)
    return train, val, info
