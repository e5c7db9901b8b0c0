"""Datasets (sharding, batching), the IDX reader and the named data sources."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distnet.data import Dataset, IDXError, load_data, read_idx, stats, write_idx
from distnet.data.idx import IMAGES_MAGIC, read_mnist_pair


def make_dataset(n: int, shape: tuple[int, ...] = (1, 2, 2)) -> Dataset:
    x = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape((n,) + shape)
    return Dataset(x, np.arange(n) % 10, name="t")


# ---- Dataset -------------------------------------------------------------------------
def test_dataset_types_and_indexing():
    ds = Dataset(np.zeros((5, 3), np.float64), np.array([0, 1, 2, 3, 4], np.int32))
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and len(ds) == 5
    sub = ds[1:3]
    assert isinstance(sub, Dataset) and len(sub) == 2 and list(sub.y) == [1, 2]
    assert list(ds[np.array([4, 0])].y) == [4, 0]
    x0, y0 = ds[2]
    assert x0.shape == (3,) and y0 == 2
    with pytest.raises(ValueError, match="same number"):
        Dataset(np.zeros((5, 3)), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="integers"):
        Dataset(np.zeros((2, 3)), np.zeros(2))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 16))
def test_shards_are_disjoint_covering_and_balanced(n, world):
    ds = make_dataset(n)
    if world > n:
        with pytest.raises(ValueError, match="shards"):
            ds.shard(0, world)
        return
    shards = [ds.shard(r, world) for r in range(world)]
    ids = np.concatenate([s.x[:, 0, 0, 0] for s in shards]) / 4  # first pixel = 4 * index
    assert len(ids) == n and set(ids.astype(int)) == set(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    again = ds.shard(world - 1, world)
    np.testing.assert_array_equal(again.x, shards[-1].x)  # deterministic


@pytest.mark.parametrize(("rank", "world"), [(-1, 2), (2, 2), (0, 0), (0.5, 2), (0, True)])
def test_shard_validates(rank, world):
    with pytest.raises(ValueError, match="rank|world"):
        make_dataset(10).shard(rank, world)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 100), batch=st.integers(1, 40), shuffle=st.booleans(),
       drop_last=st.booleans(), seed=st.integers(0, 5))
def test_batches_cover_the_epoch(n, batch, shuffle, drop_last, seed):
    ds = make_dataset(n)
    seen = []
    for xb, yb in ds.batches(batch, shuffle=shuffle, seed=seed, drop_last=drop_last):
        assert len(xb) == len(yb) <= batch
        assert xb.dtype == np.float32 and yb.dtype == np.int64
        if drop_last:
            assert len(xb) == batch
        idx = (xb[:, 0, 0, 0] / 4).astype(int)
        np.testing.assert_array_equal(yb, idx % 10)  # x and y stay paired
        seen.extend(idx.tolist())
    expected = n - n % batch if drop_last else n
    assert len(seen) == len(set(seen)) == expected
    if not drop_last:
        assert sorted(seen) == list(range(n))


def test_batches_are_seeded_per_epoch():
    ds = make_dataset(50)

    def order(seed, epoch):
        return np.concatenate([yb.copy() for _, yb in ds.batches(8, seed=seed, epoch=epoch)])

    np.testing.assert_array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))


def test_stats():
    mean, std = stats(np.array([[0.0, 1.0], [0.0, 1.0]], np.float32))
    assert (mean, std) == (0.5, 0.5)
    assert stats(np.full(4, 3.0)) == (3.0, 1.0)
    with pytest.raises(ValueError, match="empty"):
        stats(np.zeros(0))


# ---- IDX -----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    ip = write_idx(tmp_path / f"a-images-idx3-ubyte{suffix}", images)
    lp = write_idx(tmp_path / f"a-labels-idx1-ubyte{suffix}", labels)
    assert (ip.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    np.testing.assert_array_equal(read_idx(ip, IMAGES_MAGIC), images)
    x, y = read_mnist_pair(ip, lp)
    assert x.shape == (5, 1, 4, 3) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0], images / 255.0, rtol=1e-6)
    assert list(y) == [3, 1, 4, 1, 5]
    floats = np.linspace(-1, 1, 6).reshape(2, 3)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f.idx", floats)), floats)


def test_idx_wrong_magic_names_file_and_magics(tmp_path):
    lp = write_idx(tmp_path / "x-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(IDXError, match=r"x-labels-idx1-ubyte.*expected 0x00000803, got 0x00000801"):
        read_idx(lp, IMAGES_MAGIC)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(IDXError, match="not an IDX file"):
        read_idx(junk)


def test_idx_count_mismatch(tmp_path):
    ip = write_idx(tmp_path / "i.gz", np.zeros((4, 2, 2), np.uint8))
    lp = write_idx(tmp_path / "l.gz", np.zeros(3, np.uint8))
    with pytest.raises(IDXError, match="4 images but .* 3 labels"):
        read_mnist_pair(ip, lp)


def test_idx_truncated(tmp_path):
    raw = write_idx(tmp_path / "r", np.zeros((4, 2, 2), np.uint8)).read_bytes()
    (tmp_path / "t").write_bytes(raw[:-3])
    with pytest.raises(IDXError, match="truncated IDX data.*needs 16 bytes, found 13"):
        read_idx(tmp_path / "t", IMAGES_MAGIC)
    (tmp_path / "h").write_bytes(raw[:10])
    with pytest.raises(IDXError, match="truncated IDX header"):
        read_idx(tmp_path / "h")
    (tmp_path / "g.gz").write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(IDXError, match="g.gz.*truncated gzip"):
        read_idx(tmp_path / "g.gz")
    (tmp_path / "x").write_bytes(raw + b"\0")
    with pytest.raises(IDXError, match="1 unexpected bytes"):
        read_idx(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


# ---- sources -------------------------------------------------------------------------
def test_digits():
    train, val, info = load_data("digits", seed=0)
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == np.float32
    assert 0.0 <= train.x.min() and train.x.max() == 1.0
    assert info == {"name": "digits", "input_shape": [1, 8, 8], "num_classes": 10,
                    "train_size": len(train), "val_size": 359,
                    "source": "sklearn.datasets.load_digits"}
    again, _, _ = load_data("digits", seed=0)
    np.testing.assert_array_equal(again.y, train.y)
    other, _, _ = load_data("digits", seed=1)
    assert not np.array_equal(other.y, train.y)
    assert len(load_data("digits", val_size=100)[1]) == 100


def test_synthetic():
    train, val, info = load_data("synthetic:500", seed=3)
    assert (len(train), len(val)) == (400, 100) and info["input_shape"] == [1, 8, 8]
    assert set(np.unique(train.y)) == set(range(10))
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    np.testing.assert_array_equal(load_data("synthetic:500", seed=3)[0].x, train.x)
    t2, v2, i2 = load_data("synthetic", val_size=10, synthetic_shape=(3, 4, 4), num_classes=3)
    assert t2.x.shape[1:] == (3, 4, 4) and len(v2) == 10 and i2["num_classes"] == 3


@pytest.mark.parametrize(("spec", "error", "match"), [
    ("imagenet", ValueError, "unknown data spec 'imagenet'"),
    ("", ValueError, "empty data spec"),
    ("synthetic:abc", ValueError, "integer N"),
    ("mnist", ValueError, "mnist:DIR"),
    ("mnist:/nonexistent/dir", FileNotFoundError, "/nonexistent/dir"),
])
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        load_data(spec)


def test_val_size_validated():
    with pytest.raises(ValueError, match="val_size"):
        load_data("synthetic:100", val_size=100)


def _write_pair(directory, prefix, n, gz=True):
    suffix = ".gz" if gz else ""
    rng = np.random.default_rng(n)
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}",
              rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}",
              (np.arange(n) % 10).astype(np.uint8))


def test_mnist_standard_names(tmp_path):
    _write_pair(tmp_path, "train", 30, gz=False)
    _write_pair(tmp_path, "t10k", 12)
    train, val, info = load_data(f"mnist:{tmp_path}", val_size=5)
    assert (len(train), len(val)) == (30, 12)  # t10k validates; val_size does not apply
    assert info["input_shape"] == [1, 28, 28] and info["val_size"] == 12


def test_mnist_single_pair_and_file_path(tmp_path):
    _write_pair(tmp_path, "small", 40)
    train, val, _ = load_data(f"mnist:{tmp_path}", val_size=10)
    assert (len(train), len(val)) == (30, 10)
    np.testing.assert_array_equal(val.y, np.arange(30, 40) % 10)  # last examples, unshuffled
    by_file, _, _ = load_data(f"mnist:{tmp_path}/small-labels-idx1-ubyte.gz", val_size=10)
    np.testing.assert_array_equal(by_file.x, train.x)


def test_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_data(f"mnist:{tmp_path}")
    _write_pair(tmp_path, "a", 5)
    _write_pair(tmp_path, "b", 5)
    with pytest.raises(ValueError, match="several image files"):
        load_data(f"mnist:{tmp_path}")
    (tmp_path / "a-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="a-labels-idx1-ubyte"):
        load_data(f"mnist:{tmp_path}/a-images-idx3-ubyte.gz")
    only = tmp_path / "only"
    only.mkdir()
    write_idx(only / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_data(f"mnist:{only}")


def test_real_mnist(mnist_dir):
    train, val, info = load_data(f"mnist:{mnist_dir}")
    assert (len(train), len(val)) == (7000, 1000)
    assert train.x.shape == (7000, 1, 28, 28) and train.x.dtype == np.float32
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert list(train.y[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # MNIST t10k's first labels
    counts = np.bincount(np.concatenate([train.y, val.y]), minlength=10)
    assert list(counts) == [773, 905, 834, 803, 788, 723, 756, 813, 787, 818]
    assert info["source"].endswith("mnist8k-images-idx3-ubyte.gz")
