"""Convert an ImageFolder tree (ROOT/<split>/<class>/<image>) into one LMDB per split.

    python data/folder2lmdb.py -f ROOT -s train        # writes ROOT/train.lmdb
    python data/folder2lmdb.py -f ROOT -s val -p 16    # ROOT/val.lmdb, 16 reader processes
    python data/folder2lmdb.py -f ROOT -s train -o /fast/disk/train.lmdb --skip-bad

Each image's original bytes are stored with its class index (format in data/lmdb_format.py); every
image is checked to decode first. The database is written to OUT.tmp and renamed to OUT only when
complete, so an interrupted run never leaves a database that loads. An unreadable image stops the
run naming the file, unless --skip-bad skips it (the count is reported and stored). Expect about
1.28M images / 140 GB for ImageNet's train split; the progress bar shows the rate.
"""

from __future__ import annotations

import argparse
import os
import sys
from io import BytesIO
from multiprocessing import Pool
from pathlib import Path

import lmdb
from PIL import Image
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.lmdb_format import META_KEY, encode_meta, encode_record, record_key  # noqa: E402

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
COMMIT_EVERY = 5000


def scan(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted folder names) and (file, class index) in ImageFolder's order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: expected ROOT/<split>/<class>/<image> (ImageFolder layout)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class folders: expected ROOT/<split>/<class>/<image>")
    samples = []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS:
                samples.append((path, index))
    if not samples:
        raise ValueError(f"{folder} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def read_checked(path: Path) -> tuple[bytes | None, str]:
    """The file's bytes if they decode as an image, else (None, the reason)."""
    try:
        raw = path.read_bytes()
        with Image.open(BytesIO(raw)) as img:
            img.verify()
        return raw, ""
    except Exception as err:  # PIL raises many types for broken files
        return None, f"{type(err).__name__}: {err}"


def _remove(path: Path) -> None:
    for p in (path, Path(str(path) + "-lock")):
        if p.is_dir():
            for child in p.iterdir():
                child.unlink()
            p.rmdir()
        elif p.exists():
            p.unlink()


def convert(root: str | Path, split: str, out: str | Path | None = None, workers: int = 8,
            skip_bad: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    root = Path(root)
    out = Path(out) if out else root / f"{split}.lmdb"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    classes, samples = scan(root / split)
    tmp = Path(str(out) + ".tmp")
    _remove(tmp)  # a stale, unfinished conversion
    total_bytes = sum(p.stat().st_size for p, _ in samples)
    env = lmdb.open(str(tmp), subdir=False, map_size=max(1 << 30, 2 * total_bytes + (256 << 20)),
                    lock=False, meminit=False, map_async=True)
    bad: list[str] = []
    written = 0
    try:
        txn = env.begin(write=True)
        with Pool(workers) if workers > 1 else _Serial() as pool:
            results = pool.imap(read_checked, [p for p, _ in samples], chunksize=16)
            for (path, label), (raw, reason) in tqdm(zip(samples, results), total=len(samples),
                                                    desc=f"{split} -> {out.name}", unit="img", disable=not progress):
                if raw is None:
                    if not skip_bad:
                        raise ValueError(f"cannot read image {path} ({reason}); fix or remove it, or pass --skip-bad")
                    bad.append(str(path))
                    continue
                txn.put(record_key(written), encode_record(label, raw))
                written += 1
                if written % COMMIT_EVERY == 0:
                    txn.commit()
                    txn = env.begin(write=True)
        if written == 0:
            raise ValueError(f"no readable images in {root / split}")
        txn.put(META_KEY, encode_meta(written, classes, split, len(bad)))
        txn.commit()
        env.sync()
    except BaseException:
        env.close()
        _remove(tmp)
        raise
    env.close()
    if out.exists():
        _remove(out)
    os.replace(tmp, out)
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), e.g. {bad[0]}", file=sys.stderr)
    print(f"wrote {written} images of {len(classes)} classes to {out}")
    return out


class _Serial:
    """Pool's imap in this process (workers=1)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap(self, fn, items, chunksize: int = 1):  # type: ignore[no-untyped-def]
        return map(fn, items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--folder", required=True, help="ImageNet root holding train/ and val/")
    parser.add_argument("-s", "--split", required=True, help="split folder to convert (train or val)")
    parser.add_argument("-o", "--out", help="output LMDB file (default ROOT/<split>.lmdb)")
    parser.add_argument("-p", "--procs", type=int, default=8, help="reader processes (default 8)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        convert(args.folder, args.split, args.out, args.procs, args.skip_bad, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
