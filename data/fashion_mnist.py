"""Fashion-MNIST from its IDX files: data.root, or the Debian package's folder.

`apt-get install dataset-fashion-mnist` puts the four gzipped IDX files in
/usr/share/datasets/fashion-mnist; plain (gunzipped) files work too. Images are zero-padded from
28x28 to 32x32 so the CIFAR models apply unchanged; training adds random crop (padding 4) and
horizontal flip. Normalisation uses the unpadded training set's mean and std.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .info import DatasetInfo
from .tensor_dataset import split_pair

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN, STD = (0.2860,), (0.3530,)
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # unsigned bytes, 3 and 1 dimensions
NUM_CLASSES, SIDE, PAD = 10, 28, 2


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, magic: int | None = None) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array; a bad header or wrong size names the file.

    `magic`: the kind expected (IMAGE_MAGIC or LABEL_MAGIC), so swapped files are caught too.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a cut .gz raises EOFError
        raise ValueError(
            f"cannot read IDX file {path} ({err}): truncated or corrupt; reinstall "
            "dataset-fashion-mnist or copy the file again"
        ) from err
    if len(raw) < 8:
        raise ValueError(f"IDX file {path} is truncated ({len(raw)} bytes)")
    found, count = struct.unpack(">II", raw[:8])
    if found not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise ValueError(f"{path} is not an IDX image or label file (magic number {found})")
    if magic is not None and found != magic:
        kind = {IMAGE_MAGIC: "image", LABEL_MAGIC: "label"}
        raise ValueError(
            f"{path} is an IDX {kind[found]} file where an {kind[magic]} file was expected"
        )
    dims = [count]
    header = 8
    if found == IMAGE_MAGIC:
        if len(raw) < 16:
            raise ValueError(f"IDX file {path} is truncated ({len(raw)} bytes)")
        dims += list(struct.unpack(">II", raw[8:16]))
        header = 16
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(
            f"IDX file {path} is truncated or corrupt: {len(raw)} bytes, expected {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 1, 32, 32) zero-padded images, int64 labels) of split "train" or "test"."""
    image_path = _find(folder, FILES[f"{split}_images"])
    label_path = _find(folder, FILES[f"{split}_labels"])
    if image_path is None or label_path is None:
        raise FileNotFoundError(f"Fashion-MNIST {split} files missing from {folder}")
    images = read_idx(image_path, IMAGE_MAGIC)
    labels = read_idx(label_path, LABEL_MAGIC)
    if images.shape[1:] != (SIDE, SIDE):
        raise ValueError(
            f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, expected {SIDE}x{SIDE}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{label_path}: label {labels.max()} outside 0..{NUM_CLASSES - 1}")
    x = torch.from_numpy(images.copy())[:, None]  # (N, 1, 28, 28)
    x = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))  # to 32x32 with zeros
    return x, torch.from_numpy(labels.astype(np.int64))


def locate(root: str | Path | None) -> Path:
    """`root` when given (it must hold the four IDX files), else the Debian package's folder."""
    folder = Path(root) if root else DEBIAN_DIR
    missing = [stem for stem in FILES.values() if _find(folder, stem) is None]
    if missing:
        where = f"data.root={root}" if root else f"{DEBIAN_DIR} (the Debian package's folder)"
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {where}: it lacks "
            + ", ".join(f"{m}[.gz]" for m in missing)
            + ". Install the data with `sudo apt-get install dataset-fashion-mnist`"
            + (" (or leave data.root unset to read its folder)" if root else "")
            + ", or pass data.root=DIR of a folder holding the four IDX files."
        )
    return folder


def build_fashion_mnist(root: str | Path | None) -> tuple[Dataset, Dataset, DatasetInfo]:
    """60000 training and 10000 test images, 1 channel, 32x32."""
    folder = locate(root)
    info = DatasetInfo(
        name="fashion_mnist",
        num_classes=NUM_CLASSES,
        in_channels=1,
        image_size=SIDE + 2 * PAD,
        mean=MEAN,
        std=STD,
    )
    return split_pair(load_split(folder, "train"), load_split(folder, "test"), info)
