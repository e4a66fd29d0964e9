"""Data sets and the on-device batch loader: contents, determinism, sharding, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data.fashion_mnist import DEBIAN_DIR, read_idx
from data.gpu_loader import TensorBatchLoader


def test_unknown_data_set_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown data set 'mnist'.*fashion_mnist"):
        data.build_datasets("mnist")


def test_synthetic_is_deterministic_and_learnable() -> None:
    a_train, a_val, info = data.build_datasets("synthetic", num_train=64, num_val=16, image_size=16, num_classes=4, seed=3)
    b_train, _, _ = data.build_datasets("synthetic", num_train=64, num_val=16, image_size=16, num_classes=4, seed=3)
    c_train, _, _ = data.build_datasets("synthetic", num_train=64, num_val=16, image_size=16, num_classes=4, seed=4)
    xa, ya = a_train.as_tensors()
    assert xa.dtype == torch.uint8 and xa.shape == (64, 3, 16, 16) and len(a_val) == 16
    assert torch.equal(xa, b_train.as_tensors()[0]) and torch.equal(ya, b_train.as_tensors()[1])
    assert not torch.equal(xa, c_train.as_tensors()[0])
    # nearest class mean classifies held-out samples: the classes are separable
    means = torch.stack([xa[ya == k].float().mean(0) for k in range(4)])
    xv, yv = a_val.as_tensors()
    pred = torch.cdist(xv.float().flatten(1), means.flatten(1)).argmin(1)
    assert (pred == yv).float().mean() > 0.9
    x, y = a_train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and isinstance(y, int)
    assert info.num_classes == 4 and info.in_channels == 3


def _loader(n: int = 10, bs: int = 4, **kw) -> TensorBatchLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 6, 5).contiguous()
    labels = torch.arange(n)
    return TensorBatchLoader(images, labels, bs, mean=(0.0,), std=(1 / 255,), **kw)


def test_batch_loader_without_augmentation_is_the_identity_up_to_normalisation() -> None:
    loader = _loader(train=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # 10 samples, batches of 4, last one kept
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, torch.arange(10)) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0, 0], torch.arange(10).float())


def test_batch_loader_crop_and_flip_keep_content_and_reshuffle_per_epoch() -> None:
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    loader = TensorBatchLoader(images, torch.arange(12), 4, train=True, mean=(0, 0, 0), std=(1 / 255,) * 3, seed=1)
    loader.set_epoch(0)
    e0 = [(x.clone(), y.clone()) for x, y in loader]
    e0_again = list(loader)
    loader.set_epoch(1)
    e1 = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, e0_again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(e0, e1))
    for x, y in e0:
        for xi, yi in zip(x, y):
            src = images[yi].float()
            padded = torch.nn.functional.pad(src, (4, 4, 4, 4))
            windows = [padded[:, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
            windows += [w.flip(2) for w in windows]
            assert any(torch.allclose(xi, w) for w in windows)


def test_batch_loader_shards_ranks_disjointly_and_completely() -> None:
    seen = []
    for rank in range(3):
        loader = _loader(n=13, bs=2, train=True, rank=rank, world_size=3, seed=5)
        labels = torch.cat([y for _, y in loader])
        assert len(loader) == 2 and len(labels) == 4  # 13 // 3 = 4 each, equal step counts
        seen.append(set(labels.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    val = set()
    for rank in range(3):
        val |= {int(v) for _, y in _loader(n=13, bs=2, train=False, rank=rank, world_size=3) for v in y}
    assert val == set(range(13))


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_loads_60000_and_10000_images() -> None:
    train, val, info = data.build_datasets("fashion_mnist")
    assert len(train) == 60000 and len(val) == 10000
    x, y = train.as_tensors()
    assert x.shape == (60000, 1, 32, 32) and x.dtype == torch.uint8
    assert int(x[:, :, :2].max()) == 0  # zero padding from 28 to 32
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    assert info.in_channels == 1 and info.mean == (0.2860,)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">II", magic, array.shape[0]) + b"".join(struct.pack(">I", d) for d in array.shape[1:])
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_from_a_root_and_corrupt_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 8)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 2051)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8), 2049)
    train, val, _ = data.build_datasets("fashion_mnist", str(tmp_path))
    assert (len(train), len(val)) == (20, 8)
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "broken.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="broken.gz is truncated or corrupt"):
        read_idx(tmp_path / "broken.gz")
    (tmp_path / "foreign").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "foreign")


def test_fashion_mnist_missing_names_the_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("data.fashion_mnist.DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        data.build_datasets("fashion_mnist", str(tmp_path))
    assert str(tmp_path) in str(err.value)


def _fake_cifar10(root: Path, per_batch: int = 5) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_reads_the_torchvision_layout(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    train, val, info = data.build_datasets("cifar10", str(tmp_path))
    assert (len(train), len(val)) == (25, 5)
    x, _ = train.as_tensors()
    assert x.shape == (25, 3, 32, 32) and info.mean[0] == 0.4914
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    assert torch.equal(x[0], torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)))


def test_cifar_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python lacks train, test.*data.download=true"):
        data.build_datasets("cifar100", str(tmp_path))
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="test_batch is unreadable or corrupt"):
        data.build_datasets("cifar10", str(tmp_path))
