"""The ImageNet LMDB converter and reader on a small generated ImageFolder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from data import folder2lmdb
from data.imagenet import ImageNetLMDB, build_imagenet
from data.lmdb_format import META_KEY

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["n01", "n02", "n03"]


def make_tree(root: Path, split: str, per_class: int = 4) -> list[tuple[Path, int]]:
    """A few JPEG and PNG images per class; returns (file, label) in ImageFolder order."""
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            ext = "jpg" if i % 2 == 0 else "png"
            color = (40 * label + 10 * i, 100, 200 - 30 * i)
            Image.new("RGB", (24 + i, 20 + label), color).save(folder / f"img_{i}.{ext}")
    (root / split / CLASSES[0] / "notes.txt").write_text("not an image")
    return [(Path(p), y) for p, y in ImageFolder(str(root / split)).samples]


def lmdb_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".lmdb" in p.name)


def test_round_trip_keeps_bytes_labels_and_imagefolder_order(tmp_path: Path) -> None:
    expected = make_tree(tmp_path, "train")
    nested = tmp_path / "train" / "n02" / "sub"  # ImageFolder walks subfolders, after the files
    nested.mkdir()
    Image.new("RGB", (9, 9), (1, 2, 3)).save(nested / "a.PNG")
    expected = [(Path(p), y) for p, y in ImageFolder(str(tmp_path / "train")).samples]
    assert len(expected) == 13 and expected[8][0].name == "a.PNG"
    out = folder2lmdb.convert(tmp_path, "train", workers=2, progress=False)
    assert (
        out == tmp_path / "train.lmdb" and out.is_file() and lmdb_files(tmp_path) == ["train.lmdb"]
    )
    ds = ImageNetLMDB(out)
    assert len(ds) == len(expected) and ds.classes == CLASSES and ds.meta["split"] == "train"
    for i, (path, label) in enumerate(expected):
        raw, got_label = ds.raw(i)
        assert raw == path.read_bytes() and got_label == label
    img, label = ds[5]
    assert img.mode == "RGB" and label == expected[5][1]
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(expected[5][0]).convert("RGB")))
    again = ImageNetLMDB(out)  # a second reader of the same file in this process
    assert again.raw(3) == ds.raw(3)


def test_val_split_and_the_reader_in_dataloader_workers(tmp_path: Path) -> None:
    make_tree(tmp_path, "train")
    make_tree(tmp_path, "val", per_class=2)
    folder2lmdb.convert(tmp_path, "train", workers=1, progress=False)
    folder2lmdb.convert(tmp_path, "val", workers=1, progress=False)
    train, val, info = build_imagenet(tmp_path)
    assert (
        info.num_classes == 3
        and (info.num_train, info.num_val) == (12, 6)
        and val.meta["split"] == "val"
    )
    train[0]  # opened in this process first: forked workers must open their own handle
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=2)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.tolist() == [0, 0, 0, 0]
    assert val[0][0].shape == (3, 224, 224)


def test_command_line_and_refusing_to_overwrite(tmp_path: Path) -> None:
    make_tree(tmp_path, "val", per_class=2)
    cmd = [
        sys.executable,
        str(ROOT / "data" / "folder2lmdb.py"),
        "-f",
        str(tmp_path),
        "-s",
        "val",
        "-p",
        "2",
        "--no-progress",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "wrote 6 images of 3 classes" in first.stdout and (tmp_path / "val.lmdb").is_file()


def test_overwrite_and_output_elsewhere(tmp_path: Path) -> None:
    make_tree(tmp_path, "val", per_class=2)
    out = folder2lmdb.convert(tmp_path, "val", workers=1, progress=False)
    assert folder2lmdb.main(["-f", str(tmp_path), "-s", "val"]) == 1  # exists: refused
    (tmp_path / "val" / "n03" / "img_1.png").unlink()
    folder2lmdb.convert(tmp_path, "val", workers=1, overwrite=True, progress=False)
    assert len(ImageNetLMDB(out)) == 5
    other = tmp_path / "fast" / "disk" / "v.lmdb"
    folder2lmdb.convert(tmp_path, "val", out=other, workers=1, progress=False)
    assert len(ImageNetLMDB(other)) == 5


def test_refusal_message_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_tree(tmp_path, "val", per_class=1)
    assert folder2lmdb.main(["-f", str(tmp_path), "-s", "val", "-p", "1", "--no-progress"]) == 0
    assert folder2lmdb.main(["-f", str(tmp_path), "-s", "val", "-p", "1", "--no-progress"]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_unreadable_image_stops_or_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_tree(tmp_path, "train")
    bad = tmp_path / "train" / "n02" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        folder2lmdb.convert(tmp_path, "train", workers=2, progress=False)
    assert lmdb_files(tmp_path) == []  # neither the database nor its temporary file
    folder2lmdb.convert(tmp_path, "train", workers=2, skip_bad=True, progress=False)
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    ds = ImageNetLMDB(tmp_path / "train.lmdb")
    assert (
        len(ds) == 12 and ds.meta["skipped"] == 1 and ds.meta["skipped_files"] == ["n02/broken.jpg"]
    )


def test_full_decode_catches_truncated_images(tmp_path: Path) -> None:
    make_tree(tmp_path, "train", per_class=1)
    good = tmp_path / "train" / "n01" / "img_0.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(good, quality=95)
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])  # header intact: verify() passes, decoding does not
    folder2lmdb.convert(tmp_path, "train", workers=1, progress=False)
    with pytest.raises(ValueError, match="img_0.jpg.*truncated"):
        folder2lmdb.convert(
            tmp_path,
            "train",
            out=tmp_path / "full.lmdb",
            workers=1,
            full_decode=True,
            progress=False,
        )


def test_interrupted_conversion_leaves_nothing_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
        folder2lmdb.convert(tmp_path, "train", workers=2, progress=False)
    assert lmdb_files(tmp_path) == []
    with pytest.raises(
        FileNotFoundError, match=f"python data/folder2lmdb.py -f {tmp_path} -s train"
    ):
        ImageNetLMDB(tmp_path / "train.lmdb")


def test_leftover_of_a_killed_run_is_replaced_unless_still_running(tmp_path: Path) -> None:
    make_tree(tmp_path, "val", per_class=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"val.lmdb.tmp-{dead.pid}"
    stale.write_bytes(b"half a database")
    folder2lmdb.convert(tmp_path, "val", workers=1, progress=False)
    assert lmdb_files(tmp_path) == ["val.lmdb"]
    running = tmp_path / f"other.lmdb.tmp-{os.getppid()}"
    running.write_bytes(b"")
    with pytest.raises(FileExistsError, match=f"process {os.getppid()}"):
        folder2lmdb.convert(tmp_path, "val", out=tmp_path / "other.lmdb", workers=1, progress=False)


def _raw_lmdb(path: Path, records: dict[bytes, bytes], subdir: bool = False) -> None:
    env = lmdb.open(str(path), subdir=subdir, lock=False)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key, value)
    env.close()


def test_reader_rejects_unfinished_paper_truncated_and_foreign_files(tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished.lmdb"
    _raw_lmdb(unfinished, {b"00000000": b"\x00\x00\x00\x00abc"})
    with pytest.raises(ValueError, match="conversion did not finish.*folder2lmdb.py"):
        ImageNetLMDB(unfinished)
    paper = tmp_path / "train.lmdb"
    _raw_lmdb(paper, {b"0": b"pyarrow bytes", b"__len__": b"x", b"__keys__": b"y"})
    with pytest.raises(ValueError, match=f"paper's format.*-f {tmp_path} -s train --overwrite"):
        ImageNetLMDB(paper)
    paper.unlink()
    make_tree(tmp_path, "train")
    good = folder2lmdb.convert(tmp_path, "train", workers=1, progress=False)
    truncated = tmp_path / "truncated.lmdb"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(
        ValueError, match="truncated or foreign|conversion did not finish|truncated or corrupt"
    ):
        ImageNetLMDB(truncated)
    for i in range(2):  # big enough that a cut falls past the header pages: must not crash
        Image.effect_noise((128, 128), 60).convert("RGB").save(
            tmp_path / "train" / "n01" / f"big_{i}.png"
        )
    big = folder2lmdb.convert(
        tmp_path, "train", out=tmp_path / "big.lmdb", workers=1, progress=False
    )
    cut = tmp_path / "cut.lmdb"
    cut.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.lmdb is truncated"):
        ImageNetLMDB(cut)
    foreign = tmp_path / "foreign.lmdb"
    foreign.write_bytes(b"hello" * 1000)
    with pytest.raises(ValueError, match="not a readable LMDB"):
        ImageNetLMDB(foreign)
    wrong = tmp_path / "wrong.lmdb"
    _raw_lmdb(wrong, {META_KEY: b'{"format": "something-else", "version": 1}'})
    with pytest.raises(ValueError, match="format 'something-else'"):
        ImageNetLMDB(wrong)


def test_reader_accepts_a_directory_style_lmdb(tmp_path: Path) -> None:
    make_tree(tmp_path, "val", per_class=1)
    single = folder2lmdb.convert(tmp_path, "val", workers=1, progress=False)
    folder = tmp_path / "as_dir.lmdb"
    folder.mkdir()
    shutil.copy(single, folder / "data.mdb")
    ds = ImageNetLMDB(folder)
    assert len(ds) == 3 and ds.raw(2)[0] == (tmp_path / "val" / "n03" / "img_0.jpg").read_bytes()


def test_missing_or_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        folder2lmdb.convert(tmp_path, "train", progress=False)
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        folder2lmdb.convert(tmp_path, "train", progress=False)
    (tmp_path / "train" / "n01").mkdir()
    with pytest.raises(ValueError, match="no images"):
        folder2lmdb.convert(tmp_path, "train", progress=False)
    with pytest.raises(
        FileNotFoundError, match=f"python data/folder2lmdb.py -f {tmp_path} -s train`"
    ):
        build_imagenet(tmp_path)
    assert lmdb_files(tmp_path) == []
