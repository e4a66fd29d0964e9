"""ImageNet read from the LMDBs that data/folder2lmdb.py writes, with the paper's transforms.

Random access by index; each DataLoader worker opens its own read-only environment on first use
(an LMDB handle must not cross a fork).
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

import lmdb
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .info import DatasetInfo
from .lmdb_format import FORMAT, META_KEY, VERSION, decode_record, record_key

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _open(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False, meminit=False)


def read_meta(path: Path) -> dict[str, Any]:
    """The database's metadata; a missing, unfinished, truncated or foreign file is a clear error."""
    redo = f"re-run `python data/folder2lmdb.py -f ROOT -s {path.stem}` to rebuild it"
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet LMDB {path} not found; create it with `python data/folder2lmdb.py -f {path.parent} -s {path.stem}`")
    try:
        env = _open(path)
        with env.begin() as txn:
            raw = txn.get(META_KEY)
        env.close()
    except lmdb.Error as err:
        raise ValueError(f"{path} is not a readable LMDB ({err}): truncated or foreign; {redo}") from err
    if raw is None:
        raise ValueError(f"{path} has no {META_KEY.decode()} record: the conversion did not finish or the file is foreign; {redo}")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: unreadable metadata ({err}); {redo}") from err
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT!r} v{VERSION}; {redo}")
    return meta


class ImageNetLMDB(Dataset):
    def __init__(self, path: str | Path, transform: Any = None) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.classes: list[str] = self.meta["classes"]
        self.transform = transform
        self._env: lmdb.Environment | None = None

    def __len__(self) -> int:
        return int(self.meta["length"])

    def raw(self, index: int) -> tuple[bytes, int]:
        """(the original image file bytes, class index) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        if self._env is None:
            self._env = _open(self.path)
        with self._env.begin() as txn:
            value = txn.get(record_key(index))
        if value is None:
            raise ValueError(f"{self.path}: record {index} is missing; the database is corrupt, rebuild it")
        label, data = decode_record(value)
        return data, label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        data, label = self.raw(index)
        img = Image.open(BytesIO(data)).convert("RGB")
        return (self.transform(img) if self.transform else img), label

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"] = None  # each worker opens its own
        return state


def train_transform(size: int = 224) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])


def val_transform(size: int = 224, resize: int = 256) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])


def build_imagenet(root: str | Path) -> tuple[Dataset, Dataset, DatasetInfo]:
    root = Path(root)
    train = ImageNetLMDB(root / "train.lmdb", train_transform())
    val = ImageNetLMDB(root / "val.lmdb", val_transform())
    if train.classes != val.classes:
        raise ValueError(f"{root}: train.lmdb and val.lmdb list different classes; convert both from the same tree")
    return train, val, DatasetInfo("imagenet", len(train.classes), 3, 224, MEAN, STD)
