"""The ImageNet LMDB converter and reader on a small generated ImageFolder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch
from PIL import Image

from data import folder2lmdb
from data.imagenet import ImageNetLMDB, build_imagenet

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["n01", "n02", "n03"]


def make_tree(root: Path, split: str, per_class: int = 4) -> list[tuple[Path, int]]:
    """A few JPEG and PNG images per class; returns (file, label) in ImageFolder order."""
    samples = []
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            ext = "jpg" if i % 2 == 0 else "png"
            color = (40 * label + 10 * i, 100, 200 - 30 * i)
            path = folder / f"img_{i}.{ext}"
            Image.new("RGB", (24 + i, 20 + label), color).save(path)
            samples.append((path, label))
    return sorted(samples, key=lambda s: (s[1], str(s[0])))


def test_round_trip_keeps_bytes_labels_and_order(tmp_path: Path) -> None:
    expected = make_tree(tmp_path, "train")
    out = folder2lmdb.convert(tmp_path, "train", workers=2, progress=False)
    assert out == tmp_path / "train.lmdb" and out.is_file()
    ds = ImageNetLMDB(out)
    assert len(ds) == len(expected) and ds.classes == CLASSES
    for i, (path, label) in enumerate(expected):
        raw, got_label = ds.raw(i)
        assert raw == path.read_bytes() and got_label == label
    img, label = ds[5]
    assert img.mode == "RGB" and label == expected[5][1]


def test_reader_works_in_dataloader_workers_with_the_paper_transforms(tmp_path: Path) -> None:
    make_tree(tmp_path, "train")
    make_tree(tmp_path, "val", per_class=2)
    folder2lmdb.convert(tmp_path, "train", workers=1, progress=False)
    folder2lmdb.convert(tmp_path, "val", workers=1, progress=False)
    train, val, info = build_imagenet(tmp_path)
    assert info.num_classes == 3 and len(val) == 6
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=2)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 0, 0, 0]
    assert val[0][0].shape == (3, 224, 224)


def test_command_line_and_refusing_to_overwrite(tmp_path: Path) -> None:
    make_tree(tmp_path, "val", per_class=2)
    cmd = [sys.executable, str(ROOT / "data" / "folder2lmdb.py"), "-f", str(tmp_path), "-s", "val", "-p", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "wrote 6 images of 3 classes" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr
    other = tmp_path / "elsewhere.lmdb"
    assert subprocess.run(cmd + ["-o", str(other)], capture_output=True, timeout=120).returncode == 0
    assert len(ImageNetLMDB(other)) == 6


def test_unreadable_image_stops_or_is_skipped(tmp_path: Path) -> None:
    make_tree(tmp_path, "train")
    bad = tmp_path / "train" / "n02" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        folder2lmdb.convert(tmp_path, "train", workers=2, progress=False)
    assert not (tmp_path / "train.lmdb").exists() and not (tmp_path / "train.lmdb.tmp").exists()
    folder2lmdb.convert(tmp_path, "train", workers=2, skip_bad=True, progress=False)
    ds = ImageNetLMDB(tmp_path / "train.lmdb")
    assert len(ds) == 12 and ds.meta["skipped"] == 1


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path, "train")
    calls = {"n": 0}
    real = folder2lmdb.encode_record

    def failing(label: int, raw: bytes) -> bytes:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(label, raw)

    monkeypatch.setattr(folder2lmdb, "encode_record", failing)
    with pytest.raises(KeyboardInterrupt):
        folder2lmdb.convert(tmp_path, "train", workers=1, progress=False)
    assert not (tmp_path / "train.lmdb").exists()
    with pytest.raises(FileNotFoundError, match="folder2lmdb.py"):
        ImageNetLMDB(tmp_path / "train.lmdb")


def test_reader_rejects_unfinished_truncated_and_foreign_files(tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished.lmdb"
    env = lmdb.open(str(unfinished), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", b"\x00\x00\x00\x00abc")
    env.close()
    with pytest.raises(ValueError, match="conversion did not finish"):
        ImageNetLMDB(unfinished)
    make_tree(tmp_path, "train")
    good = folder2lmdb.convert(tmp_path, "train", workers=1, progress=False)
    truncated = tmp_path / "truncated.lmdb"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ValueError, match="truncated or foreign|conversion did not finish"):
        ImageNetLMDB(truncated)
    foreign = tmp_path / "foreign.lmdb"
    foreign.write_bytes(b"hello" * 1000)
    with pytest.raises(ValueError, match="not a readable LMDB"):
        ImageNetLMDB(foreign)


def test_missing_or_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        folder2lmdb.convert(tmp_path, "train", progress=False)
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        folder2lmdb.convert(tmp_path, "train", progress=False)
    (tmp_path / "train" / "n01").mkdir()
    with pytest.raises(ValueError, match="no images"):
        folder2lmdb.convert(tmp_path, "train", progress=False)
    with pytest.raises(FileNotFoundError, match="python data/folder2lmdb.py -f"):
        build_imagenet(tmp_path)
