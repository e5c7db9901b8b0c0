"""Weight sharing (1-D k-means, centroid fine-tuning) and linear quantization."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.linear_quant import (
    affine_codebook,
    quantization_error,
    quantize_model,
    quantize_tensor,
)
from compression.prune import prune_model
from compression.quantize import CentroidUpdate, kmeans_1d, share_weights
from distnet import nn
from distnet.train import train_step


def check_kmeans(values, km):
    c = km.centroids.astype(np.float64)
    assert np.all(np.diff(c) >= 0), "centroids must be sorted"
    dist = np.abs(np.asarray(values, np.float64).ravel()[:, None] - c[None, :])
    chosen = dist[np.arange(dist.shape[0]), km.labels]
    assert np.all(chosen <= dist.min(axis=1) + 1e-12 * (1 + np.abs(c).max()))
    assert np.all(np.diff(km.history) <= 1e-9 * (1 + km.history[0])), "loss went up"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=300),
       st.integers(1, 40), st.sampled_from(["linear", "random", "density"]))
def test_kmeans_properties(values, k, init):
    values = np.array(values, np.float32)
    km = kmeans_1d(values, k, init=init)
    assert km.centroids.size <= k and km.labels.shape == values.shape
    check_kmeans(values, km)
    if len(np.unique(values)) <= k:  # few distinct values: represented exactly
        np.testing.assert_array_equal(km.centroids[km.labels], values)


@pytest.mark.parametrize("init", ["linear", "random", "density"])
def test_kmeans_266k_weights_is_fast_and_good(init):
    rng = np.random.default_rng(0)
    w = rng.laplace(0, 0.05, 266_200).astype(np.float32)
    w = w[np.abs(w) > 0.03]  # pruned-looking: two lobes
    t0 = time.perf_counter()
    km = kmeans_1d(w, 32, init=init)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"k-means took {elapsed:.2f} s"
    check_kmeans(w[:20_000], kmeans_1d(w[:20_000], 32, init=init))
    rms = np.sqrt(km.inertia / w.size)
    assert rms < 0.01 * np.abs(w).max()  # 32 levels over the range: ~1/64 of it at most
    assert km.history[-1] <= km.history[0]


@pytest.mark.slow  # importing scikit-learn alone takes seconds
def test_kmeans_matches_sklearn_on_the_same_start():
    sklearn = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, 5000).astype(np.float32)
    ours = kmeans_1d(w, 8, init="linear", tol=0)
    init = np.linspace(w.min(), w.max(), 8).reshape(-1, 1)
    ref = sklearn.KMeans(8, init=init, n_init=1, tol=0, max_iter=300).fit(w.reshape(-1, 1))
    np.testing.assert_allclose(np.sort(ref.cluster_centers_.ravel()), ours.centroids,
                               rtol=1e-4, atol=1e-5)


def test_kmeans_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans_1d(np.ones(3), 0)
    with pytest.raises(ValueError, match="unknown k-means init"):
        kmeans_1d(np.arange(10.0), 3, init="nope")
    assert kmeans_1d(np.zeros(0), 4).centroids.size == 0


def mlp(seed=0):
    return nn.Sequential(nn.Linear(12, 16, seed=seed), nn.ReLU(), nn.Linear(16, 3, seed=seed + 1))


def test_share_weights_writes_codebook_values_and_keeps_pruned_zero():
    model = mlp()
    prune_model(model, 0.6)
    shared = share_weights(model, {"0.weight": 3, "2.weight": 2})
    for name, p in model.named_parameters():
        if name in shared:
            kept = p.data[p.mask != 0]
            assert len(np.unique(kept)) <= 2 ** shared[name].bits
            assert set(np.unique(kept)) <= set(shared[name].centroids.data.tolist())
            assert np.all(p.data[p.mask == 0] == 0)
    with pytest.raises(KeyError, match="no parameters named"):
        share_weights(mlp(), {"9.weight": 4})


def test_centroid_gradient_is_the_sum_of_members_and_finetuning_learns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    model = mlp()
    prune_model(model, 0.5)
    shared = share_weights(model, {"0.weight": 3, "2.weight": 3})
    update = CentroidUpdate.build(model, shared, "sgd", lr=0.01, others_lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    first = train_step(model, loss_fn, x, y)
    sp = shared["0.weight"]
    sp.accumulate_grad()
    grad = sp.param.grad.reshape(-1)
    manual = [grad[sp.positions[sp.labels == j]].sum() for j in range(sp.centroids.size)]
    np.testing.assert_allclose(sp.centroids.grad, manual, rtol=1e-5, atol=1e-6)
    for step in range(60):
        update(step)
        last = train_step(model, loss_fn, x, y)
    assert last < first
    for name, sp in shared.items():
        p = sp.param
        assert np.all(p.data[p.mask == 0] == 0), name
        np.testing.assert_array_equal(p.data.reshape(-1)[sp.positions],
                                      sp.centroids.data[sp.labels])


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_linear_quantization(scheme, per_channel, bits):
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(6, 40)) * np.arange(1, 7)[:, None]).astype(np.float32)
    w[:, :5] = 0
    qt = quantize_tensor(w, bits, scheme, per_channel)
    assert qt.codes.shape == w.shape and qt.codes.min() >= qt.qmin and qt.codes.max() <= qt.qmax
    assert qt.scale.size == (6 if per_channel else 1)
    deq = qt.dequantize()
    assert deq.dtype == np.float32
    assert np.all(deq[:, :5] == 0), "zero must be exactly representable"
    step = np.repeat(qt.scale, w.size // qt.scale.size).reshape(w.shape)
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)
    if bits == 8:
        assert quantization_error(w, qt)["sqnr_db"] > 35
    if scheme == "symmetric":
        assert -qt.qmin == qt.qmax == 2 ** (bits - 1) - 1


def test_per_channel_beats_per_tensor_on_uneven_rows():
    rng = np.random.default_rng(4)
    w = (rng.normal(size=(8, 64)) * np.logspace(-2, 0, 8)[:, None]).astype(np.float32)
    e_tensor = quantization_error(w, quantize_tensor(w, 4))["rms"]
    e_channel = quantization_error(w, quantize_tensor(w, 4, per_channel=True))["rms"]
    assert e_channel < e_tensor


def test_ternary():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 50)).astype(np.float32)
    qt = quantize_tensor(w, scheme="ternary")
    deq = qt.dequantize()
    a = float(qt.scale[0])
    assert set(np.unique(deq)) <= {-a, 0.0, a}
    t = 0.7 * np.abs(w).mean()
    assert np.all(deq[np.abs(w) <= t] == 0) and np.all(np.sign(deq[np.abs(w) > t]) ==
                                                       np.sign(w[np.abs(w) > t]))
    np.testing.assert_allclose(a, np.abs(w[np.abs(w) > t]).mean(), rtol=1e-6)
    given = quantize_tensor(w, scheme="ternary", threshold=1.5)
    assert np.all(given.dequantize()[np.abs(w) <= 1.5] == 0)


def test_quantize_model_and_codebook_agree():
    model = mlp()
    prune_model(model, 0.5)
    qts = quantize_model(model, bits=8, per_channel=True)
    assert set(qts) == {"0.weight", "2.weight"}
    for name, p in model.named_parameters():
        if name in qts:
            np.testing.assert_array_equal(p.data, qts[name].dequantize())
            assert np.all(p.data[p.mask == 0] == 0)
    book = affine_codebook(np.array([0.5], np.float32), np.array([2]), 0, 3)
    np.testing.assert_array_equal(book, [[-1.0, -0.5, 0.0, 0.5]])
    with pytest.raises(ValueError, match="2 to 8 bits"):
        quantize_tensor(np.ones(3), bits=9)
    with pytest.raises(ValueError, match="unknown scheme"):
        quantize_tensor(np.ones(3), scheme="log")
