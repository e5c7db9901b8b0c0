"""Checkpoints: round trips, optimizer state, and refusal of damaged or foreign files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from distnet import nn
from distnet.checkpoint import (
    CheckpointError,
    build_optimizer_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from distnet.optim import build_optimizer


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8, seed=1), nn.ReLU(),
                         nn.Linear(8, 3, seed=2))


def train_steps(model, optimizer, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad[...] = rng.standard_normal(p.shape)
        optimizer.step()


@pytest.fixture()
def saved(tmp_path):
    model = make_model()
    model[1].weight.set_mask((np.arange(96).reshape(8, 12) % 3 != 0).astype(np.float32))
    opt = build_optimizer("adam", model, lr=0.01, weight_decay=1e-4)
    train_steps(model, opt, 3)
    path = save_checkpoint(tmp_path / "ckpt.npz", model, opt,
                           meta={"model": "tiny", "epoch": 3, "acc": np.float32(0.5),
                                 "data": {"name": "synthetic", "input_shape": [1, 3, 4]}})
    return path, model, opt


def test_round_trip(saved):
    path, model, opt = saved
    ckpt = load_checkpoint(path)
    assert ckpt.model.to_spec() == model.to_spec()
    restored = ckpt.model.state_dict()
    assert list(restored) == list(model.state_dict())
    for name, a in model.state_dict().items():
        np.testing.assert_array_equal(restored[name], a, err_msg=name)
    assert ckpt.model[1].weight.mask is not None  # masks travel with the model
    x = np.random.default_rng(0).random((2, 1, 3, 4), dtype=np.float32)
    np.testing.assert_array_equal(ckpt.model.forward(x), model.forward(x))
    assert ckpt.meta["format"] == "distnet-checkpoint" and ckpt.meta["version"] == 1
    assert ckpt.meta["model"] == "tiny" and ckpt.meta["epoch"] == 3 and ckpt.meta["acc"] == 0.5
    assert ckpt.meta["data"]["input_shape"] == [1, 3, 4]
    assert ckpt.optimizer_info == {"name": "adam", "config": opt.get_config()}


def test_optimizer_resumes_identically(saved):
    path, model, opt = saved
    ckpt = load_checkpoint(path)
    resumed = build_optimizer_from_checkpoint(ckpt)
    assert resumed.step_count == 3 and resumed.get_config() == opt.get_config()
    train_steps(model, opt, 2, seed=9)
    train_steps(ckpt.model, resumed, 2, seed=9)
    for a, b in zip(model.parameters(), ckpt.model.parameters(), strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    assert np.all(ckpt.model[1].weight.data[ckpt.model[1].weight.mask == 0] == 0)


def test_model_only_and_no_pickle(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "sub" / "m.npz", model)
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"meta", "model/1.weight", "model/1.bias", "model/3.weight",
                                  "model/3.bias"}
        meta = json.loads(npz["meta"].tobytes())
    assert meta["optimizer"] is None and meta["spec"] == model.to_spec()
    ckpt = load_checkpoint(path)
    assert ckpt.optimizer_state == {} and ckpt.optimizer_info is None
    with pytest.raises(CheckpointError, match="no optimizer"):
        build_optimizer_from_checkpoint(ckpt)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["m.npz"]  # no temp left


def test_save_refuses_bad_meta(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "a.npz", make_model(), meta={"spec": 1})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "a.npz", make_model(), meta={"x": object()})
    assert not any(tmp_path.iterdir())


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_checkpoint(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="not a zip"):
        load_checkpoint(tmp_path / "text.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="was it written by distnet"):
        load_checkpoint(tmp_path / "plain.npz")


def test_truncated_refused(saved):
    path, _, _ = saved
    raw = path.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 1, len(raw) - 40, 30):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated|damaged"):
            load_checkpoint(path)


def test_every_flipped_byte_refused(saved):
    path, _, _ = saved
    raw = path.read_bytes()
    positions = np.random.default_rng(0).choice(len(raw), 60, replace=False).tolist()
    positions += [0, 10, len(raw) - 1, len(raw) - 80, len(raw) - 100]
    for pos in positions:
        damaged = bytearray(raw)
        damaged[pos] ^= 0x40
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


def _rewrite(path, drop=(), replace=None):
    """A new archive with members dropped/replaced, resealed by save_checkpoint's writer."""
    from distnet.checkpoint import _write_atomic

    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in drop}
    arrays.update(replace or {})
    _write_atomic(path, arrays)


def _meta_array(meta):
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def test_zip_crc_error_refused(saved, monkeypatch):
    path, _, _ = saved
    import distnet.checkpoint as ck

    monkeypatch.setattr(ck, "_verify_digest", lambda p: None)  # reach the zip CRC check
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("model/1.weight.npy")
    raw[info.header_offset + 30 + len(info.filename) + 200] ^= 1  # inside the array bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC"):
        load_checkpoint(path)


def test_meta_problems_refused(saved):
    path, _, _ = saved
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes())
    _rewrite(path, drop=("meta",))
    with pytest.raises(CheckpointError, match="no 'meta'"):
        load_checkpoint(path)
    _rewrite(path, replace={"meta": _meta_array({**meta, "format": "other"})})
    with pytest.raises(CheckpointError, match="not a distnet checkpoint"):
        load_checkpoint(path)
    _rewrite(path, replace={"meta": _meta_array({**meta, "version": 2})})
    with pytest.raises(CheckpointError, match="version 2 is not supported"):
        load_checkpoint(path)
    _rewrite(path, replace={"meta": np.frombuffer(b"{not json", np.uint8)})
    with pytest.raises(CheckpointError, match="not UTF-8 JSON"):
        load_checkpoint(path)


def test_arrays_not_matching_spec_refused(saved):
    path, _, _ = saved
    _rewrite(path, replace={"model/1.weight": np.zeros((8, 11), np.float32)})
    with pytest.raises(CheckpointError, match="1.weight"):
        load_checkpoint(path)
    _rewrite(path, drop=("model/3.bias",))
    with pytest.raises(CheckpointError, match="missing.*3.bias"):
        load_checkpoint(path)


def test_optimizer_state_not_matching_refused(saved):
    path, _, _ = saved
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="optimizer state"):
        build_optimizer_from_checkpoint(ckpt, nn.Sequential(nn.Linear(12, 8)))
