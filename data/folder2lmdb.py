"""Convert an ImageFolder tree (ROOT/<split>/<class>/<image>) into one LMDB per split.

    python data/folder2lmdb.py -f ROOT -s train        # writes ROOT/train.lmdb
    python data/folder2lmdb.py -f ROOT -s val -p 16    # ROOT/val.lmdb, 16 reader processes
    python data/folder2lmdb.py -f ROOT -s train -o /fast/disk/train.lmdb --skip-bad

Classes are the sorted folder names and images are taken in ImageFolder's order, so record i is
torchvision ImageFolder's sample i. Each image's original bytes are stored with its class index
(format: data/lmdb_format.py); every image is first checked with PIL (`Image.verify()`, or a full
decode with --full-decode, which also catches truncated JPEGs). The database is written to
OUT.tmp-<pid> and renamed to OUT only when complete, so an interrupted run never leaves a database
that loads; the next run removes such a leftover. An unreadable image stops the run naming the
file, unless --skip-bad skips it (the count is printed and stored). An existing OUT is kept unless
--overwrite. Expect about 1.28M images / 140 GB for ImageNet's train split and 50k / 6.4 GB for
val; the progress bar shows the rate, which is usually bounded by the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from io import BytesIO
from multiprocessing.pool import Pool
from pathlib import Path

import lmdb
from PIL import Image
from tqdm import tqdm

from data.lmdb_format import META_KEY, encode_meta, encode_record, record_key

# torchvision ImageFolder's extensions, matched case-insensitively
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
COMMIT_EVERY = 5000
PAGE = 4096


def scan(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted folder names) and (file, class index) in torchvision ImageFolder's order."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist: expected ROOT/<split>/<class>/<image> (ImageFolder layout)"
        )
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class folders: expected ROOT/<split>/<class>/<image>")
    samples = []
    for index, name in enumerate(classes):
        # exactly torchvision.datasets.folder.make_dataset: sorted walk, sorted names per folder
        for dirpath, _, filenames in sorted(os.walk(folder / name, followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMG_EXTENSIONS):
                    samples.append((Path(dirpath) / filename, index))
    if not samples:
        raise ValueError(f"{folder} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def read_checked(path: Path, full_decode: bool = False) -> tuple[bytes | None, str]:
    """The file's bytes if PIL accepts them as an image, else (None, the reason)."""
    try:
        raw = path.read_bytes()
        with Image.open(BytesIO(raw)) as img:
            if full_decode:
                img.load()
            else:
                img.verify()
        return raw, ""
    except Exception as err:  # PIL raises many types for broken files
        return None, f"{type(err).__name__}: {err}"


def _remove(path: Path) -> None:
    """Delete an LMDB file or directory, with the lock file LMDB may have left beside it."""
    for p in (path, Path(f"{path}-lock")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _clear_stale(out: Path) -> None:
    """Remove leftovers of killed conversions into `out`; refuse if one is still running."""
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        if tmp.name.endswith("-lock"):
            continue
        pid_text = tmp.name.rsplit(".tmp-", 1)[1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            raise FileExistsError(
                f"{tmp} is being written by process {pid_text}: another conversion into {out} "
                "is running; wait for it, or stop it and run again"
            )
        _remove(tmp)


def _imap(
    fn: Callable[[Path], tuple[bytes | None, str]],
    paths: list[Path],
    workers: int,
) -> tuple[Pool | None, Iterable[tuple[bytes | None, str]]]:
    """Results of fn over paths, in order, read by `workers` processes (this one when 1)."""
    if workers <= 1:
        return None, map(fn, paths)
    pool = Pool(workers)
    return pool, pool.imap(fn, paths, chunksize=16)


def convert(
    root: str | Path,
    split: str,
    out: str | Path | None = None,
    workers: int = 8,
    skip_bad: bool = False,
    overwrite: bool = False,
    full_decode: bool = False,
    progress: bool = True,
) -> Path:
    """Write ROOT/<split> as an LMDB (default ROOT/<split>.lmdb); returns its path.

    Raises FileNotFoundError for a missing folder, FileExistsError for an existing output without
    `overwrite`, ValueError naming the first unreadable image unless `skip_bad`.
    """
    root = Path(root)
    out = Path(out) if out else root / f"{split}.lmdb"
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    classes, samples = scan(root / split)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    total_bytes = sum(p.stat().st_size for p, _ in samples)
    # address space only: the file grows as pages are used. Values are stored whole on overflow
    # pages, so allow a page of rounding per image, plus B-tree pages.
    map_size = 2 * total_bytes + 2 * PAGE * len(samples) + (1 << 30)
    env = lmdb.open(
        str(tmp), subdir=False, map_size=map_size, lock=False, meminit=False, map_async=True
    )
    skipped: list[str] = []
    written = 0
    pool: Pool | None = None
    try:
        pool, results = _imap(
            partial(read_checked, full_decode=full_decode), [p for p, _ in samples], workers
        )
        bar: Iterator[tuple[tuple[Path, int], tuple[bytes | None, str]]] = tqdm(
            zip(samples, results),
            total=len(samples),
            desc=f"{split} -> {out.name}",
            unit="img",
            disable=not progress,
        )
        txn = env.begin(write=True)
        for (path, label), (raw, reason) in bar:
            if raw is None:
                if not skip_bad:
                    raise ValueError(
                        f"cannot read image {path} ({reason}); fix or remove it, or pass --skip-bad"
                    )
                skipped.append(str(path.relative_to(root / split)))
                continue
            txn.put(record_key(written), encode_record(label, raw))
            written += 1
            if written % COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
        if written == 0:
            raise ValueError(f"no readable images in {root / split} ({len(skipped)} skipped)")
        # written last: its presence marks the database complete
        txn.put(META_KEY, encode_meta(written, classes, split, skipped))
        txn.commit()
        env.sync(True)
        env.close()
    except BaseException:  # also KeyboardInterrupt: leave nothing that could pass for a database
        if pool is not None:
            pool.terminate()
        env.close()
        _remove(tmp)
        raise
    if pool is not None:
        pool.close()
        pool.join()
    if out.is_dir():  # a directory-style database cannot be replaced by a rename
        shutil.rmtree(out)
    os.replace(tmp, out)
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(
            f"skipped {len(skipped)} unreadable image(s) in {root / split}: {shown}",
            file=sys.stderr,
        )
    size_gb = out.stat().st_size / 1e9
    print(f"wrote {written} images of {len(classes)} classes to {out} ({size_gb:.2f} GB)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-f", "--folder", required=True, help="ImageNet root holding train/ and val/"
    )
    parser.add_argument(
        "-s", "--split", required=True, help="split folder to convert (train or val)"
    )
    parser.add_argument("-o", "--out", help="output LMDB file (default ROOT/<split>.lmdb)")
    parser.add_argument(
        "-p",
        "--workers",
        "--procs",
        dest="workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes reading and checking images (default: min(8, CPUs))",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images instead of stopping"
    )
    parser.add_argument(
        "--full-decode",
        action="store_true",
        help="decode every image fully (catches truncated files; slower) instead of PIL verify()",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    args = parser.parse_args(argv)
    try:
        convert(
            args.folder,
            args.split,
            args.out,
            workers=args.workers,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            full_decode=args.full_decode,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
