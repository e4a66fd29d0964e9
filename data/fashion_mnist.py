"""Fashion-MNIST from its IDX files: data.root, or the Debian package's folder.

`apt-get install dataset-fashion-mnist` puts the four (gzipped) IDX files in
/usr/share/datasets/fashion-mnist. Images are zero-padded from 28x28 to 32x32 so the CIFAR models
apply unchanged; training adds random crop (padding 4) and horizontal flip.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .info import DatasetInfo
from .tensor_dataset import ImageTensorDataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN, STD = (0.2860,), (0.3530,)
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array; a bad header or short file names the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}; reinstall dataset-fashion-mnist") from err
    if len(raw) < 8:
        raise ValueError(f"IDX file {path} is truncated ({len(raw)} bytes)")
    magic, count = struct.unpack(">II", raw[:8])
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise ValueError(f"{path} is not an IDX image or label file (magic number {magic})")
    dims = [count]
    header = 8
    if magic == IMAGE_MAGIC:
        if len(raw) < 16:
            raise ValueError(f"IDX file {path} is truncated ({len(raw)} bytes)")
        dims += list(struct.unpack(">II", raw[8:16]))
        header = 16
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(f"IDX file {path} is truncated or corrupt: {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(_find(folder, FILES[f"{split}_images"]))  # type: ignore[arg-type]
    labels = read_idx(_find(folder, FILES[f"{split}_labels"]))  # type: ignore[arg-type]
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
    x = torch.from_numpy(images.copy())[:, None]  # (N, 1, 28, 28)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))  # to 32x32 with zeros
    return x, torch.from_numpy(labels.astype(np.int64))


def locate(root: str | None) -> Path:
    candidates = ([Path(root)] if root else []) + [DEBIAN_DIR]
    for folder in candidates:
        if all(_find(folder, stem) for stem in FILES.values()):
            return folder
    raise FileNotFoundError(
        "Fashion-MNIST not found: looked for the four IDX files (train-images-idx3-ubyte[.gz], ...) in "
        + ", ".join(str(c) for c in candidates)
        + ". Install them with `sudo apt-get install dataset-fashion-mnist` or pass data.root=DIR."
    )


def build_fashion_mnist(root: str | None) -> tuple[Dataset, Dataset, DatasetInfo]:
    folder = locate(root)
    info = DatasetInfo("fashion_mnist", 10, 1, 32, MEAN, STD)
    train = ImageTensorDataset(*load_split(folder, "train"), info, train=True)
    val = ImageTensorDataset(*load_split(folder, "test"), info, train=False)
    return train, val, info
