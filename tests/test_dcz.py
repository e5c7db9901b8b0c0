"""The .dcz file: exact round trips, sizes, and refusal of damaged or mismatched files."""

import struct
import zlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import dcz
from compression.linear_quant import quantize_model
from compression.prune import prune_model
from compression.quantize import share_weights
from distnet import nn
from distnet.nn.conv import Conv2d
from distnet.nn.pool import MaxPool2d


def small_cnn():
    return nn.Sequential(
        nn.Normalize(0.1, 0.3), Conv2d(1, 4, 3, padding=1, seed=1), nn.ReLU(), MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 32, seed=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 5, seed=3))


def compressed_cnn():
    model = small_cnn()
    model.train()
    model(np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))  # BN statistics
    prune_model(model, {"1": 0.5, "5": 0.9, "8": 0.7})
    share_weights(model, {"1.weight": 8, "5.weight": 5, "8.weight": 4})
    return model.eval()


def assert_same_model(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
        assert sa[key].dtype == sb[key].dtype, key
    a.eval(), b.eval()
    np.testing.assert_array_equal(a(x), b(x))  # bitwise: the decoded weights are the same


@pytest.fixture()
def x():
    return np.random.default_rng(1).random((8, 1, 8, 8), dtype=np.float32)


def test_roundtrip_pruned_and_shared_is_exact(tmp_path, x):
    model = compressed_cnn()
    stats = dcz.save_dcz(tmp_path / "m.dcz", model, meta={"note": "test", "acc": 0.5})
    loaded = dcz.load_dcz(tmp_path / "m.dcz")
    assert_same_model(model, loaded.model, x)
    assert loaded.meta == {"note": "test", "acc": 0.5}
    assert stats["file_bytes"] == (tmp_path / "m.dcz").stat().st_size
    by_name = {t["name"]: t for t in stats["tensors"]}
    assert by_name["5.weight"]["encoding"] == "book" and by_name["5.weight"]["gap_bits"] > 0
    assert by_name["5.weight"]["kept"] == round(0.1 * 64 * 32)
    for name, p in loaded.model.named_parameters():  # masks come back, so retraining keeps zeros
        if name.endswith("weight") and p.data.ndim > 1:
            assert p.mask is not None and np.all(p.data[p.mask == 0] == 0), name


@pytest.mark.parametrize("per_channel", [False, True])
def test_roundtrip_linear_quantized_is_exact(tmp_path, x, per_channel):
    model = small_cnn().eval()
    prune_model(model, {"5": 0.5})
    qts = quantize_model(model, bits=8, per_channel=per_channel)
    stats = dcz.save_dcz(tmp_path / "q.dcz", model, quantized=qts)
    assert_same_model(model, dcz.load_dcz(tmp_path / "q.dcz").model, x)
    dense = sum(p.size * 4 for p in model.parameters())
    assert stats["file_bytes"] < dense / 3  # 8-bit codes, half the fc weights pruned


def test_unpruned_float_model_roundtrips(tmp_path, x):
    model = small_cnn().eval()
    dcz.save_dcz(tmp_path / "f.dcz", model)
    assert_same_model(model, dcz.load_dcz(tmp_path / "f.dcz").model, x)


def test_float16_exact_values_are_stored_in_half(tmp_path):
    model = nn.Sequential(nn.Linear(30, 20, seed=0))
    for p in model.parameters():
        p.data[...] = p.data.astype(np.float16).astype(np.float32)
    stats = dcz.save_dcz(tmp_path / "h.dcz", model)
    assert {t["name"]: t["value_bytes"] for t in stats["tensors"]} == {
        "0.weight": 30 * 20 * 2, "0.bias": 20 * 2}
    assert_same_model(model, dcz.load_dcz(tmp_path / "h.dcz").model,
                      np.ones((2, 30), np.float32))


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 5000), max_size=200), st.integers(1, 12))
def test_relative_indices_with_fillers_roundtrip(positions, gap_bits):
    positions = np.array(sorted(positions), dtype=np.int64)
    symbols = dcz.gap_symbols(positions, gap_bits)
    assert symbols.max(initial=0) <= 2**gap_bits - 1
    np.testing.assert_array_equal(dcz.positions_from_gaps(symbols, gap_bits), positions)


def test_filler_count_matches_the_paper_rule():
    # Gap 20 with 3-bit gaps (max advance 7 per symbol): 2 fillers, then a real entry.
    symbols = dcz.gap_symbols(np.array([19]), 3)
    np.testing.assert_array_equal(symbols, [7, 7, 5])


@pytest.fixture()
def blob(tmp_path):
    path = tmp_path / "c.dcz"
    dcz.save_dcz(path, compressed_cnn())
    return path, path.read_bytes()


def write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:12], "truncated|not a .dcz"),
    (lambda b: b + b"\0", "trailing"),
    (lambda b: b"PK\x03\x04" + b[4:], "bad magic"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
    (lambda b: b[:30] + bytes([b[30] ^ 0xFF]) + b[31:], "header corrupted"),
    (lambda b: b[:-5] + bytes([b[-5] ^ 0x01]) + b[-4:], "payload corrupted"),
    (lambda b: b"", "only 0 bytes"),
], ids=["cut", "cut-header", "trailing", "magic", "version", "header", "payload", "empty"])
def test_damaged_files_are_refused(blob, damage, message):
    path, data = blob
    with pytest.raises(dcz.DczError, match=message):
        dcz.load_dcz(write(path, damage(data)))


def rewrite_header(data, edit):
    """Re-pack a file after editing its header, with valid CRCs (a consistent-looking lie)."""
    fixed = dcz._FIXED
    _, version, flags, hlen, plen, _, pcrc = fixed.unpack_from(data)
    head = msgpack.unpackb(zlib.decompress(data[fixed.size : fixed.size + hlen]), raw=False)
    edit(head)
    header = zlib.compress(msgpack.packb(head, use_bin_type=True))
    payload = data[fixed.size + hlen :]
    return fixed.pack(dcz.MAGIC, version, flags, len(header), plen, zlib.crc32(header),
                      pcrc) + header + payload


def test_mismatched_spec_and_streams_are_refused(blob):
    path, data = blob

    def wider(head):
        head["spec"]["children"][5][1]["config"]["out_features"] = 33

    with pytest.raises(dcz.DczError, match="shape"):
        dcz.load_dcz(write(path, rewrite_header(data, wider)))

    def drop(head):
        head["tensors"].pop(0)

    with pytest.raises(dcz.DczError, match="do not match"):
        dcz.load_dcz(write(path, rewrite_header(data, drop)))

    def overrun(head):
        rec = next(r for r in head["tensors"] if r["name"] == "5.weight")
        rec["values"]["index"]["off"] = 10**6

    with pytest.raises(dcz.DczError, match="outside the payload"):
        dcz.load_dcz(write(path, rewrite_header(data, overrun)))

    def miscount(head):
        rec = next(r for r in head["tensors"] if r["name"] == "5.weight")
        rec["values"]["index"]["count"] += 3

    with pytest.raises(dcz.DczError, match="5.weight"):
        dcz.load_dcz(write(path, rewrite_header(data, miscount)))


def test_missing_file_and_no_pickle(tmp_path):
    with pytest.raises(FileNotFoundError):
        dcz.load_dcz(tmp_path / "absent.dcz")
    path = tmp_path / "p.dcz"
    dcz.save_dcz(path, small_cnn())
    assert b"pickle" not in path.read_bytes() and struct.calcsize("<4sBBIIII") == 22


def test_structurally_changed_models_rebuild_from_the_file(tmp_path, x):
    from compression.fold import fold_batchnorm
    from compression.lowrank import factorize_model
    from compression.structured import prune_units

    model = compressed_cnn()
    prune_units(model, 5, 8)  # fc 32 -> 24 units: BN and the next fc shrink too
    fold_batchnorm(model)
    factorize_model(model, "1:r=3")
    dcz.save_dcz(tmp_path / "s.dcz", model)
    loaded = dcz.load_dcz(tmp_path / "s.dcz").model
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in model]
    assert_same_model(model, loaded, x)


def test_fully_pruned_and_unpruned_masks_roundtrip(tmp_path):
    model = nn.Sequential(nn.Linear(6, 5, seed=0), nn.ReLU(), nn.Linear(5, 3, seed=1))
    model[0].weight.set_mask(np.zeros((5, 6)))  # everything pruned
    model[2].weight.set_mask(np.ones((3, 5)))  # a mask that prunes nothing
    stats = dcz.save_dcz(tmp_path / "e.dcz", model)
    assert {t["name"]: t["kept"] for t in stats["tensors"]}["0.weight"] == 0
    loaded = dcz.load_dcz(tmp_path / "e.dcz").model
    assert_same_model(model, loaded, np.ones((2, 6), np.float32))
    assert np.all(loaded[0].weight.mask == 0) and np.all(loaded[2].weight.mask == 1)
