"""Data sets and the on-device batch loader: contents, determinism, sharding, errors."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from data.fashion_mnist import DEBIAN_DIR, read_idx
from data.gpu_loader import TensorBatchLoader
from data.synthetic import prototypes


def test_names_and_unknown_data_set() -> None:
    assert data.list_datasets() == ["cifar10", "cifar100", "fashion_mnist", "imagenet", "synthetic"]
    with pytest.raises(ValueError, match="unknown data set 'mnist'.*fashion_mnist"):
        data.build_datasets("mnist")


def _synthetic(seed: int, **kw: int) -> tuple:
    sizes = dict(num_train=64, num_val=16, image_size=16, num_classes=4) | kw
    return data.build_datasets("synthetic", None, seed=seed, **sizes)


def test_synthetic_is_deterministic_and_learnable() -> None:
    a_train, a_val, info = _synthetic(3)
    b_train, b_val, _ = _synthetic(3)
    c_train, _, _ = _synthetic(4)
    xa, ya = a_train.as_tensors()
    assert xa.dtype == torch.uint8 and xa.shape == (64, 3, 16, 16) and len(a_val) == 16
    assert torch.equal(xa, b_train.as_tensors()[0]) and torch.equal(ya, b_train.as_tensors()[1])
    assert torch.equal(a_val.as_tensors()[0], b_val.as_tensors()[0])
    assert not torch.equal(xa, c_train.as_tensors()[0])
    # the class prototypes differ clearly (mean absolute gap far above the noise's effect)
    protos = prototypes(16, 4, 3, seed=3)
    gaps = (protos[:, None] - protos[None]).abs().mean(dim=(2, 3, 4))
    assert gaps[~torch.eye(4, dtype=torch.bool)].min() > 20
    # nearest class mean classifies held-out samples: the classes are separable
    means = torch.stack([xa[ya == k].float().mean(0) for k in range(4)])
    xv, yv = a_val.as_tensors()
    pred = torch.cdist(xv.float().flatten(1), means.flatten(1)).argmin(1)
    assert (pred == yv).float().mean() > 0.9
    x, y = a_train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16) and isinstance(y, int)
    assert (info.num_classes, info.in_channels, info.num_train, info.num_val) == (4, 3, 64, 16)


def test_synthetic_options_and_bad_sizes() -> None:
    train, _, info = _synthetic(0, num_train=8, image_size=8, in_channels=1)
    assert train.as_tensors()[0].shape == (8, 1, 8, 8) and info.mean == (0.5,)
    with pytest.raises(ValueError, match="data.num_train=0"):
        _synthetic(0, num_train=0)


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
    assert torch.equal(y, torch.arange(10)) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[:, 0, 0, 0], torch.arange(10).float())
    # training order with no crop and no flip: a permutation of the untouched images
    images = torch.randint(0, 256, (9, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    plain = TensorBatchLoader(
        images, torch.arange(9), 3, train=True, mean=mean, std=std, crop_padding=0, flip=False
    )
    for x, y in plain:
        expected = (images[y].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
            std
        ).view(1, 3, 1, 1)
        assert torch.allclose(x, expected, atol=1e-5)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_batch_loader_crop_and_flip_match_the_per_image_transforms(pad_mode: str) -> None:
    """Each sample is F.pad + crop at its drawn offset + flip: RandomCrop(padding=4), HFlip."""
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    loader = TensorBatchLoader(
        images,
        torch.arange(12),
        5,
        train=True,
        mean=(0, 0, 0),
        std=(1 / 255,) * 3,
        seed=1,
        pad_mode=pad_mode,
    )
    loader.set_epoch(2)
    order, offsets, flips = loader._plan()
    assert offsets is not None and flips is not None and 0 < int(flips.sum()) < 12
    got = torch.cat([x for x, _ in loader])
    assert len(got) == 10  # drop_last for training
    for k, i in enumerate(order[:10].tolist()):
        padded = F.pad(images[i : i + 1].float(), (4, 4, 4, 4), mode=pad_mode)[0]
        r, c = offsets[k].tolist()
        crop = padded[:, r : r + 8, c : c + 8]
        assert torch.equal(got[k], crop.flip(2) if flips[k] else crop)


def test_batch_loader_reshuffles_per_epoch_deterministically() -> None:
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    kw = dict(train=True, mean=(0.5,) * 3, std=(0.25,) * 3, seed=1)
    loader, other = (TensorBatchLoader(images, torch.arange(12), 4, **kw) for _ in range(2))
    loader.set_epoch(0)
    e0 = [(x.clone(), y.clone()) for x, y in loader]
    e0_again = list(loader)
    other.set_epoch(1)
    list(other)  # another epoch first does not change epoch 0's batches
    other.set_epoch(0)
    e0_other = list(other)
    loader.set_epoch(1)
    e1 = list(loader)
    for a, b, c in zip(e0, e0_again, e0_other):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(e0, e1))


def test_batch_loader_shards_ranks_disjointly_and_completely() -> None:
    seen = []
    for rank in range(3):
        loader = _loader(n=13, bs=2, train=True, rank=rank, world_size=3, seed=5)
        labels = torch.cat([y for _, y in loader])
        assert len(loader) == 2 and len(labels) == 4  # 13 // 3 = 4 each, equal step counts
        seen.append(set(labels.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    # without drop_last, each rank covers its whole equal share of the epoch's permutation
    shares = [
        {
            int(v)
            for _, y in _loader(
                n=13, bs=3, train=True, rank=r, world_size=3, seed=5, drop_last=False
            )
            for v in y
        }
        for r in range(3)
    ]
    assert [len(s) for s in shares] == [4, 4, 4] and len(set.union(*shares)) == 12
    val = []
    for rank in range(3):
        val += [
            int(v) for _, y in _loader(n=13, bs=2, train=False, rank=rank, world_size=3) for v in y
        ]
    assert sorted(val) == list(range(13))  # evaluation: every sample exactly once


def test_batch_loader_rejects_bad_arguments() -> None:
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        TensorBatchLoader(
            images.float(), torch.arange(4), 2, train=True, mean=(0,) * 3, std=(1,) * 3
        )
    with pytest.raises(ValueError, match="one value per channel"):
        TensorBatchLoader(images, torch.arange(4), 2, train=True, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="rank=3"):
        TensorBatchLoader(
            images,
            torch.arange(4),
            2,
            train=True,
            mean=(0,) * 3,
            std=(1,) * 3,
            rank=3,
            world_size=2,
        )


@pytest.mark.skipif(
    not DEBIAN_DIR.is_dir(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_loads_60000_and_10000_images() -> None:
    train, val, info = data.build_datasets("fashion_mnist")
    assert len(train) == 60000 and len(val) == 10000
    x, y = train.as_tensors()
    assert x.shape == (60000, 1, 32, 32) and x.dtype == torch.uint8
    assert (
        int(x[:, :, :2].max()) == 0 and int(x[:, :, :, -2:].max()) == 0
    )  # zero padding from 28 to 32
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    assert (
        info.in_channels == 1
        and info.mean == (0.2860,)
        and (info.num_train, info.num_val) == (60000, 10000)
    )
    # the stated mean and std are those of the unpadded training images
    inner = x[:, :, 2:-2, 2:-2].float() / 255
    assert abs(inner.mean().item() - 0.2860) < 1e-3 and abs(inner.std().item() - 0.3530) < 1e-3
    assert val[0][0].shape == (1, 32, 32)


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = True) -> None:
    header = struct.pack(">II", magic, array.shape[0]) + b"".join(
        struct.pack(">I", d) for d in array.shape[1:]
    )
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _fake_fashion(folder: Path, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", 20), ("t10k", 8)):
        _write_idx(
            folder / f"{split}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            2051,
            gz,
        )
        _write_idx(
            folder / f"{split}-labels-idx1-ubyte{suffix}",
            rng.integers(0, 10, (n,), dtype=np.uint8),
            2049,
            gz,
        )


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_a_root(tmp_path: Path, gz: bool) -> None:
    _fake_fashion(tmp_path, gz)
    train, val, info = data.build_datasets("fashion_mnist", str(tmp_path))
    assert (len(train), len(val)) == (20, 8) and info.image_size == 32
    x, _ = val.as_tensors()
    assert x.shape == (8, 1, 32, 32)


def test_fashion_mnist_corrupt_truncated_or_swapped_files(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="short.gz is truncated or corrupt"):
        read_idx(tmp_path / "short.gz")
    cut = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(cut[: len(cut) // 2])  # the gzip stream itself ends early
    with pytest.raises(ValueError, match="cannot read IDX file .*cut.gz"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "foreign").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "foreign")
    # labels where images belong: named, not silently reshaped
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        (tmp_path / "train-labels-idx1-ubyte.gz").read_bytes()
    )
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is an IDX label file"):
        data.build_datasets("fashion_mnist", str(tmp_path))


def test_fashion_mnist_missing_names_the_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = tmp_path / "debian"
    _fake_fashion(debian, True)  # present, but an explicit data.root must not fall back to it
    monkeypatch.setattr("data.fashion_mnist.DEBIAN_DIR", debian)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        data.build_datasets("fashion_mnist", str(tmp_path / "typo"))
    assert f"data.root={tmp_path / 'typo'}" in str(err.value) and "train-images-idx3-ubyte" in str(err.value)
    monkeypatch.setattr("data.fashion_mnist.DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Debian package's folder") as err:
        data.build_datasets("fashion_mnist", None)
    assert str(tmp_path / "nowhere") in str(err.value)


def test_given_class_count_or_size_must_agree_with_a_real_data_set(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, True)
    assert data.build_datasets("fashion_mnist", str(tmp_path), num_classes=10, image_size=32)[2].num_classes == 10
    with pytest.raises(ValueError, match="data.num_classes=5 contradicts fashion_mnist, which has 10"):
        data.build_datasets("fashion_mnist", str(tmp_path), num_classes=5)
    with pytest.raises(ValueError, match="data.image_size=64 contradicts"):
        data.build_datasets("fashion_mnist", str(tmp_path), image_size=64)


def _fake_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, name: str = "cifar10", per_batch: int = 5) -> None:
    """Batches pickled like the python-version archives (str keys, uint8 rows of 3072) with their
    meta file; torchvision's md5 list is pointed at these files, so its integrity check runs."""
    import hashlib

    import torchvision

    folder_name, train_files, test_files, label_key, meta, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                    "labels", ("batches.meta", "label_names"), 10),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", ("meta", "fine_label_names"), 100),
    }[name]
    folder = root / folder_name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for file in train_files + test_files:
        batch = {
            "batch_label": file,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, per_batch).tolist(),
            "filenames": [f"img_{i}.png" for i in range(per_batch)],
        }
        with open(folder / file, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / meta[0], "wb") as f:
        pickle.dump({meta[1]: [f"class{i}" for i in range(classes)]}, f, protocol=2)

    def md5(file: str) -> str:
        return hashlib.md5((folder / file).read_bytes()).hexdigest()

    cls = getattr(torchvision.datasets, {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}[name])
    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f in test_files])
    monkeypatch.setattr(cls, "meta", {"filename": meta[0], "key": meta[1], "md5": md5(meta[0])})


def test_cifar_reads_the_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar(tmp_path, monkeypatch)
    train, val, info = data.build_datasets("cifar10", str(tmp_path))
    assert (len(train), len(val)) == (25, 5) and (info.num_train, info.num_val) == (25, 5)
    x, y = train.as_tensors()
    assert x.shape == (25, 3, 32, 32) and info.mean[0] == 0.4914 and info.pad_mode == "constant"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    assert torch.equal(x[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert int(y[0]) == first["labels"][0]
    nhwc, labels = train.as_arrays()
    assert nhwc.shape == (25, 32, 32, 3) and np.array_equal(
        nhwc[0], first["data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    )
    sample, label = train[0]
    assert sample.shape == (3, 32, 32) and sample.dtype == torch.float32 and label == labels[0]


def test_cifar100_uses_its_own_normalisation_and_reflect_fill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar(tmp_path, monkeypatch, "cifar100", per_batch=7)
    train, val, info = data.build_datasets("cifar100", str(tmp_path))
    assert (len(train), len(val), info.num_classes) == (7, 7, 100)
    assert info.pad_mode == "reflect" and info.mean[0] == pytest.approx(125.3 / 255)


def test_cifar_missing_or_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar100 not found or corrupt in .*cifar-100-python.*data.download=true") as err:
        data.build_datasets("cifar100", str(tmp_path))
    assert "cifar-100-python.tar.gz" in str(err.value)
    _fake_cifar(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")  # fails its md5 check
    with pytest.raises(FileNotFoundError, match="cifar10 not found or corrupt"):
        data.build_datasets("cifar10", str(tmp_path))


@pytest.mark.parametrize("train", [True, False])
def test_both_loaders_take_one_epoch_order(train: bool) -> None:
    """The DataLoader sampler (ImageNet) and the batch loader (small data sets) shard and shuffle
    alike, from (seed, epoch) alone."""
    from harness.loaders import EpochShardSampler

    images = torch.zeros(23, 1, 4, 4, dtype=torch.uint8)
    for rank in range(3):
        for epoch in (0, 5):
            loader = TensorBatchLoader(images, torch.arange(23), 2, train=train, mean=(0.0,), std=(1.0,),
                                       seed=4, rank=rank, world_size=3)
            loader.set_epoch(epoch)
            sampler = EpochShardSampler(23, shuffle=train, seed=4, rank=rank, world_size=3)
            sampler.set_epoch(epoch)
            assert loader._plan()[0].tolist() == [index for index, _ in sampler]


def test_a_mid_epoch_start_gives_the_rest_of_that_epoch() -> None:
    """A run resumed at batch k sees batches k.. of the epoch, augmentation included, from both
    loaders (the batches before k are not built)."""
    from torch.utils.data import TensorDataset

    from harness.distributed import DistInfo
    from harness.loaders import Loaders, sample_loader

    images = torch.randint(0, 256, (20, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(20)
    batch_loader = TensorBatchLoader(images, labels, 3, train=True, mean=(0.5,), std=(0.2,), seed=1)
    data_loader = sample_loader(TensorDataset(images, labels), 3, train=True, seed=1, dist=DistInfo())
    for train_loader in (batch_loader, data_loader):
        loaders = Loaders(train_loader, TensorBatchLoader(images, labels, 5, train=False, mean=(0.5,), std=(0.2,)))
        loaders.set_epoch(2)
        full = list(loaders.train)
        loaders.set_epoch(2, start_batch=4)
        rest = list(loaders.train)
        assert len(full) == 6 and len(rest) == 2
        for (xa, ya), (xb, yb) in zip(full[4:], rest):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        loaders.set_epoch(3)
        assert len(list(loaders.train)) == 6  # the next epoch starts at its beginning again


def test_dataloader_augmentation_is_a_function_of_seed_epoch_and_sample() -> None:
    """ImageNet's path: a sample's random transform gives the same pixels whichever worker (or the
    main process) builds it, another draw in another epoch, and iterating leaves the global
    generators (DIVISION's, dropout's) where they were."""
    from torch.utils.data import Dataset

    from harness.distributed import DistInfo
    from harness.loaders import Loaders, sample_loader

    class Noisy(Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.rand(3) + random.random() + float(np.random.rand()), index

    def per_sample(workers: int) -> list[torch.Tensor]:
        """Each epoch's augmented samples, in sample order."""
        loader = sample_loader(Noisy(), 4, train=True, seed=3, dist=DistInfo(), workers=workers)
        loaders = Loaders(loader, loader)
        out = []
        for epoch in (0, 1):
            loaders.set_epoch(epoch)
            torch.manual_seed(7)
            before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
            batches = list(loaders.train)
            assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
            assert np.array_equal(np.random.get_state()[1], before[2])
            ids = torch.cat([y for _, y in batches])
            assert sorted(ids.tolist()) == list(range(12))
            out.append(torch.cat([x for x, _ in batches])[ids.argsort()])
        return out

    inline, two_workers = per_sample(0), per_sample(2)
    assert all(torch.equal(a, b) for a, b in zip(inline, two_workers))
    assert (inline[0] != inline[1]).all()  # every sample drawn anew in the next epoch
