"""The ImageNet LMDB format (shared by folder2lmdb.py, which writes it, and imagenet.py).

One LMDB file per split (subdir=False, as the paper's converter made for a new path). Record i has
key b"%08d" % i and value = little-endian int32 class index followed by the image file's original
bytes (no re-encoding). Key b"__meta__" holds UTF-8 JSON: {"format": FORMAT, "version": VERSION,
"length": n, "classes": [...], "split": "train", "skipped": k}. It is written last, so a database
without it is an unfinished conversion. No pickle and no pyarrow.serialize (removed in pyarrow 12).
"""

from __future__ import annotations

import json
import struct

FORMAT = "division-imagefolder-lmdb"
VERSION = 1
META_KEY = b"__meta__"
LABEL = struct.Struct("<i")


def record_key(index: int) -> bytes:
    return b"%08d" % index


def encode_record(label: int, image_bytes: bytes) -> bytes:
    return LABEL.pack(label) + image_bytes


def decode_record(value: bytes) -> tuple[int, bytes]:
    return LABEL.unpack_from(value)[0], bytes(value[LABEL.size :])


def encode_meta(length: int, classes: list[str], split: str, skipped: int) -> bytes:
    meta = {"format": FORMAT, "version": VERSION, "length": length, "classes": classes,
            "split": split, "skipped": skipped}
    return json.dumps(meta).encode()
