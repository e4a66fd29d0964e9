"""ImageNet read from the LMDBs that data/folder2lmdb.py writes, with the paper's transforms.

    python data/folder2lmdb.py -f ROOT -s train && python data/folder2lmdb.py -f ROOT -s val
    python train.py experiment=resnet50_imagenet data.root=ROOT

Random access by index. The environment is opened lazily in the process that reads (an LMDB handle
must not cross a fork), so DataLoader workers each open their own read-only one.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from pathlib import Path
from typing import Any

import lmdb
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .info import DatasetInfo
from .lmdb_format import (
    FORMAT,
    META_KEY,
    PAPER_KEYS,
    VERSION,
    decode_record,
    open_readonly,
    record_key,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_command(path: Path) -> str:
    """The folder2lmdb command that (re)creates `path`."""
    if path.suffix == ".lmdb" and path.stem in ("train", "val"):
        return f"python data/folder2lmdb.py -f {path.parent} -s {path.stem} --overwrite"
    return f"python data/folder2lmdb.py -f IMAGENET_ROOT -s SPLIT -o {path} --overwrite"


# (st_dev, st_ino) of the data file -> (pid that opened it, environment)
_ENVS: dict[tuple[int, int], tuple[int, lmdb.Environment]] = {}


def _data_file(path: Path) -> Path:
    return path / "data.mdb" if path.is_dir() else path


def shared_env(path: Path) -> lmdb.Environment:
    """This process's read-only environment of the database at `path`.

    LMDB forbids opening one file twice in a process, and a handle inherited through fork (a
    DataLoader worker) must not be used, so environments are shared per file and process; the
    child's copies of inherited ones are closed (the parent's stay open).
    """
    pid = os.getpid()
    for key, (owner, env) in list(_ENVS.items()):
        if owner != pid:
            env.close()
            del _ENVS[key]
    st = _data_file(path).stat()
    key = (st.st_dev, st.st_ino)
    if key not in _ENVS:
        _ENVS[key] = (pid, open_readonly(path))
    return _ENVS[key][1]


def _drop_env(path: Path) -> None:
    try:
        st = _data_file(path).stat()
    except OSError:
        return
    owner_env = _ENVS.pop((st.st_dev, st.st_ino), None)
    if owner_env is not None:
        owner_env[1].close()


def read_meta(path: Path) -> dict[str, Any]:
    """The database's metadata; a missing, unfinished, truncated or foreign one is a clear error."""
    redo = f"re-run `{build_command(path)}` to rebuild it"
    if not path.exists():
        raise FileNotFoundError(
            f"ImageNet LMDB {path} not found; create it from the ImageFolder tree "
            f"{path.parent}/{path.stem}/<class>/<image> with "
            f"`{build_command(path).removesuffix(' --overwrite')}`"
        )
    try:
        env = shared_env(path)
        # a cut file would crash the process (SIGBUS) on the first read past its end: check first
        size = _data_file(path).stat().st_size
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        if size < needed:
            raise ValueError(f"{path} is truncated ({size} bytes, its pages need {needed}); {redo}")
        with env.begin() as txn:
            raw = txn.get(META_KEY)
            paper_format = raw is None and any(txn.get(k) is not None for k in PAPER_KEYS)
            meta = _parse_meta(path, raw, paper_format, redo)
            length = meta["length"]
            if length > 0 and txn.get(record_key(length - 1)) is None:
                raise ValueError(f"{path} lacks record {length - 1} of {length}: corrupt; {redo}")
    except (lmdb.Error, OSError) as err:
        _drop_env(path)
        raise ValueError(
            f"{path} is not a readable LMDB ({err}): truncated or foreign; {redo}"
        ) from err
    except ValueError:
        _drop_env(path)
        raise
    return meta


def _parse_meta(path: Path, raw: bytes | None, paper_format: bool, redo: str) -> dict[str, Any]:
    if raw is None and paper_format:
        raise ValueError(
            f"{path} is in the paper's format (pyarrow.serialize records, unreadable since "
            f"pyarrow 12), not this project's; {redo} from the image folders"
        )
    if raw is None:
        raise ValueError(
            f"{path} has no {META_KEY.decode()} record: the conversion did not finish or the "
            f"file is foreign; {redo}"
        )
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: unreadable metadata ({err}); {redo}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"{path} is format {found!r}, expected {FORMAT!r} v{VERSION}; {redo}")
    if not isinstance(meta.get("length"), int) or not isinstance(meta.get("classes"), list):
        raise ValueError(f"{path}: metadata lacks length or classes; {redo}")
    return meta


class ImageNetLMDB(Dataset):
    """(transformed RGB image, class index) pairs from one LMDB split."""

    def __init__(self, path: str | Path, transform: Any = None) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.classes: list[str] = self.meta["classes"]
        self.transform = transform
        self._env: lmdb.Environment | None = None
        self._env_pid = -1  # the process that `_env` belongs to

    def __len__(self) -> int:
        return int(self.meta["length"])

    def _txn_env(self) -> lmdb.Environment:
        if self._env is None or self._env_pid != os.getpid():  # first use, or inherited by fork
            self._env = shared_env(self.path)
            self._env_pid = os.getpid()
        return self._env

    def raw(self, index: int) -> tuple[bytes, int]:
        """(the original image file bytes, class index) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        with self._txn_env().begin(buffers=False) as txn:
            value = txn.get(record_key(index))
        if value is None:
            raise ValueError(
                f"{self.path}: record {index} is missing; the database is corrupt, rebuild it: "
                f"{build_command(self.path)}"
            )
        label, data = decode_record(value)
        return data, label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        data, label = self.raw(index)
        try:
            img = Image.open(BytesIO(data)).convert("RGB")
        except OSError as err:
            raise ValueError(f"{self.path}: record {index} does not decode ({err})") from err
        return (self.transform(img) if self.transform else img), label

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_env"], state["_env_pid"] = None, -1  # each worker opens its own
        return state


def train_transform(size: int = 224) -> transforms.Compose:
    """The paper's (torchvision reference) training preset."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def val_transform(size: int = 224, resize: int = 256) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def build_imagenet(root: str | Path) -> tuple[Dataset, Dataset, DatasetInfo]:
    """ROOT/train.lmdb and ROOT/val.lmdb with the paper's transforms."""
    root = Path(root)
    train = ImageNetLMDB(root / "train.lmdb", train_transform())
    val = ImageNetLMDB(root / "val.lmdb", val_transform())
    if train.classes != val.classes:
        raise ValueError(
            f"{root}: train.lmdb and val.lmdb list different classes; "
            "convert both from the same tree"
        )
    info = DatasetInfo(
        name="imagenet",
        num_classes=len(train.classes),
        in_channels=3,
        image_size=224,
        mean=MEAN,
        std=STD,
        num_train=len(train),
        num_val=len(val),
    )
    return train, val, info
