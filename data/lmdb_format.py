"""The ImageNet LMDB format, shared by folder2lmdb.py (which writes it) and imagenet.py (reads it).

One LMDB per split, a single file (subdir=False: what the paper's converter, Efficient-PyTorch's
tools/folder2lmdb.py, made for a new path); a directory-style LMDB (data.mdb inside) is read too.
- Record i (0-based, ImageFolder order): key b"%08d" % i; value = little-endian int32 class index
  followed by the image file's original bytes (no re-encoding, no pickle).
- Key b"__meta__": UTF-8 JSON {"format": FORMAT, "version": VERSION, "length": n, "classes": [...],
  "split": "train", "skipped": k, "skipped_files": [...]}. It is written in the last transaction,
  so a database without it is an unfinished conversion.
The paper's records were pyarrow.serialize((bytes, label)) with b"__keys__"/b"__len__"; that API is
gone since pyarrow 12, so such databases are recognised and rejected with the command to rebuild.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import lmdb

FORMAT = "division-imagefolder-lmdb"
VERSION = 1
META_KEY = b"__meta__"
PAPER_KEYS = (b"__len__", b"__keys__")  # the paper's pyarrow-serialized format
LABEL = struct.Struct("<i")


def record_key(index: int) -> bytes:
    return b"%08d" % index


def encode_record(label: int, image_bytes: bytes) -> bytes:
    return LABEL.pack(label) + image_bytes


def decode_record(value: bytes) -> tuple[int, bytes]:
    """(class index, original image file bytes)."""
    return LABEL.unpack_from(value)[0], bytes(value[LABEL.size :])


def encode_meta(length: int, classes: list[str], split: str, skipped_files: list[str]) -> bytes:
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "length": length,
        "classes": classes,
        "split": split,
        "skipped": len(skipped_files),
        "skipped_files": skipped_files,
    }
    return json.dumps(meta).encode()


def open_readonly(path: Path) -> lmdb.Environment:
    """A read-only environment without locking or readahead (many random readers, as the paper)."""
    return lmdb.open(
        str(path),
        subdir=path.is_dir(),
        readonly=True,
        lock=False,
        readahead=False,
        meminit=False,
        max_readers=1024,
    )
