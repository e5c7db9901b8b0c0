"""Gradient codecs: round trips, unbiased int8 rounding, top-k error feedback, bytes."""

from __future__ import annotations

import numpy as np
import pytest
from test_ps_server import PARAMS, grads_for, serving

from distnet.ps.client import PSClient
from distnet.ps.codecs import CODECS, TopK, build_codec, payload_nbytes
from distnet.ps.protocol import Entry, ProtocolError, decode, encode
from distnet.ps.transport import frames_nbytes


def _roundtrip(codec, g, key="w"):
    payload, meta = codec.compress(key, g)
    return codec.decompress(payload, meta, g.shape, g.dtype), payload, meta


def test_none_is_exact_and_zero_copy():
    g = np.random.default_rng(0).standard_normal((30, 7)).astype(np.float32)
    out, payload, _ = _roundtrip(build_codec("none"), g)
    np.testing.assert_array_equal(out, g)
    assert np.shares_memory(payload[0], g)


def test_fp16_roundtrip_close():
    g = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    out, payload, _ = _roundtrip(build_codec("fp16"), g)
    assert out.dtype == np.float32 and payload_nbytes(payload) == 2000
    np.testing.assert_allclose(out, g, rtol=1e-3, atol=1e-4)


def test_int8_error_within_one_step_and_zero_tensor():
    codec = build_codec("int8", seed=3)
    g = np.random.default_rng(2).standard_normal((50, 20)).astype(np.float32)
    out, payload, meta = _roundtrip(codec, g)
    assert payload[0].dtype == np.int8 and payload_nbytes(payload) == g.size
    assert np.abs(out - g).max() <= meta["scale"] * (1 + 1e-5)
    zeros, _, meta0 = _roundtrip(codec, np.zeros(10, np.float32))
    assert meta0["scale"] == 0.0 and not zeros.any()


def test_int8_stochastic_rounding_is_unbiased():
    # values between grid points: round-to-nearest would be biased, stochastic is not
    g = np.array([1.0, 0.3, -0.3, 0.55, -0.77, 0.01], np.float32)
    codec = build_codec("int8", seed=11)
    trials = 4000
    total = np.zeros_like(g, dtype=np.float64)
    for _ in range(trials):
        out, _, meta = _roundtrip(codec, g)
        total += out
    mean = total / trials
    scale = 1.0 / 127
    # each decode has std <= scale / 2: the mean's std is <= scale / (2 sqrt(trials))
    assert np.abs(mean - g).max() < 5 * scale / (2 * np.sqrt(trials))
    nearest = np.round(g / scale) * scale
    assert np.abs(nearest - g).max() > 5 * scale / (2 * np.sqrt(trials))  # the test can tell


def test_int8_seeding():
    g = np.random.default_rng(4).standard_normal(500).astype(np.float32)
    a = build_codec("int8", seed=1).compress("w", g)[0][0]
    b = build_codec("int8", seed=1).compress("w", g)[0][0]
    c = build_codec("int8", seed=2).compress("w", g)[0][0]
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_int8_refuses_non_finite():
    with pytest.raises(ValueError, match="not finite"):
        build_codec("int8").compress("w", np.array([1.0, np.nan], np.float32))


def test_topk_keeps_largest_and_counts_bytes():
    g = np.zeros(10_000, np.float32)
    big = np.random.default_rng(5).choice(g.size, 100, replace=False)
    g[big] = np.linspace(5, 10, 100)
    codec = TopK(ratio=0.01)
    out, payload, meta = _roundtrip(codec, g)
    assert meta["k"] == 100
    assert payload[0].dtype == np.int32 and payload[1].dtype == np.float32
    assert payload_nbytes(payload) == 100 * 8  # vs 40,000 bytes dense
    np.testing.assert_array_equal(out, g)
    assert not codec.residuals["w"].any()


def test_topk_error_feedback_sums_to_true_total():
    rng = np.random.default_rng(6)
    codec = TopK(ratio=0.05)
    shape = (40, 25)
    true_total = np.zeros(shape, np.float64)
    sent_total = np.zeros(shape, np.float64)
    for _ in range(30):
        g = rng.standard_normal(shape).astype(np.float32)
        true_total += g
        out, _, _ = _roundtrip(codec, g)
        sent_total += out
    residual = codec.residuals["w"].reshape(shape)
    np.testing.assert_allclose(sent_total + residual, true_total, rtol=1e-4, atol=1e-4)
    # with no new gradient the residual drains out completely
    for _ in range(40):
        out, _, _ = _roundtrip(codec, np.zeros(shape, np.float32))
        sent_total += out
    np.testing.assert_allclose(sent_total, true_total, rtol=1e-4, atol=1e-4)


def test_topk_residual_is_per_key():
    codec = TopK(ratio=0.1)
    codec.compress("a", np.arange(10, dtype=np.float32))
    codec.compress("b", -np.arange(20, dtype=np.float32))
    assert set(codec.residuals) == {"a", "b"} and codec.residuals["b"].size == 20
    codec.reset()
    assert not codec.residuals


def test_topk_rejects_bad_indices_and_ratio():
    with pytest.raises(ValueError, match="ratio"):
        TopK(ratio=0.0)
    idx = np.array([0, 10], np.int32)
    vals = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="out of range"):
        TopK().decompress([idx, vals], {"k": 2}, (10,), np.dtype(np.float32))


@pytest.mark.parametrize("name, meta, match", [
    ("int8", {}, "scale"),
    ("int8", {"scale": -1.0}, "non-negative"),
    ("int8", {"scale": float("nan")}, "finite"),
    ("int8", {"scale": True}, "scale"),
    ("topk", {"k": 11}, "outside"),
    ("topk", {"k": "3"}, "integer"),
])
def test_layout_rejects_bad_meta(name, meta, match):
    with pytest.raises(ValueError, match=match):
        CODECS[name].layout(meta, (10,), np.dtype(np.float32))


@pytest.mark.parametrize("name, config, ratio", [
    ("none", {}, 1.0), ("fp16", {}, 0.5), ("int8", {"seed": 0}, 0.25),
    ("topk", {"ratio": 0.01}, 0.02),
])
def test_codecs_over_the_wire(name, config, ratio):
    """Bytes on the wire per codec, and decode(encode(...)) gives back the tensor."""
    g = np.random.default_rng(7).standard_normal((256, 64)).astype(np.float32)
    codec = build_codec(name, **config)
    payload, meta = codec.compress("w", g)
    frames = encode({"op": "push", "wid": 0, "seq": 1, "ver": 0},
                    [Entry("w", g.dtype, g.shape, payload, meta)], codec=name)
    array_bytes = frames_nbytes(frames[1:])
    assert array_bytes == pytest.approx(ratio * g.nbytes, rel=0.01)
    msg = decode([bytes(memoryview(f)) for f in frames])
    e = msg.entries[0]
    out = codec.decompress(e.payload, e.meta, e.shape, e.dtype)
    expected = codec.decompress(payload, meta, g.shape, g.dtype)
    np.testing.assert_array_equal(out, expected)


def test_wire_rejects_topk_frame_of_wrong_length():
    frames = encode({"op": "push", "wid": 0, "seq": 1, "ver": 0},
                    [Entry("w", np.dtype(np.float32), (10,),
                           [np.arange(2, dtype=np.int32), np.ones(2, np.float32)], {"k": 3})],
                    codec="topk")
    with pytest.raises(ProtocolError, match="expected 24 = 3 x int32 \\+ 3 x float32"):
        decode(frames)


@pytest.mark.parametrize("name, config", [
    ("fp16", {}), ("int8", {"seed": 5}), ("topk", {"ratio": 0.25})])
def test_compressed_pushes_are_decoded_on_the_server(name, config):
    g = grads_for(0, 0)
    with serving(optimizer="sgd", optimizer_config={"lr": 1.0}, mode="async") as server, \
            PSClient([server.address], 0, codec=name, codec_config=config) as c:
        c.register()
        c.wait(c.push(g, 0))
        sent = c.bytes_sent
        _, params = c.wait(c.pull())
    local = build_codec(name, **config)
    for k in PARAMS:
        payload, meta = local.compress(k, g[k])
        expected = PARAMS[k] - local.decompress(payload, meta, g[k].shape, g[k].dtype)
        np.testing.assert_allclose(params[k], expected, rtol=1e-6, atol=1e-6)
    dense = sum(a.nbytes for a in g.values())
    assert sent < 0.6 * dense + 2000
