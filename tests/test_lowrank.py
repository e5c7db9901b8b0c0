"""Low-rank factorisation (truncated SVD) and batch-norm folding."""

import numpy as np
import pytest

from compression import fold, lowrank
from distnet import nn
from distnet.nn.conv import Conv2d
from distnet.nn.module import from_spec
from distnet.nn.pool import MaxPool2d


def test_rank_choice():
    s = np.array([4.0, 2.0, 1.0, 0.5])
    assert lowrank.choose_rank(s, 100, 50, rank=2) == 2
    assert lowrank.choose_rank(s, 100, 50, rank=9) == 4  # capped at the full rank
    assert lowrank.choose_rank(s, 100, 100, ratio=0.1) == 5 - 1  # 0.1*100*100/200 = 5 -> cap 4
    assert lowrank.choose_rank(s, 100, 50, energy=16 / 21.25) == 1
    assert lowrank.choose_rank(s, 100, 50, energy=20.1 / 21.25) == 3
    with pytest.raises(ValueError, match="exactly one"):
        lowrank.choose_rank(s, 10, 10)
    with pytest.raises(ValueError, match="ratio"):
        lowrank.choose_rank(s, 10, 10, ratio=0.0)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_linear_factorisation_error_is_the_tail_singular_values(rank):
    layer = nn.Linear(40, 24, seed=0)
    w = layer.weight.data.astype(np.float64)
    s = np.linalg.svd(w, compute_uv=False)
    (first, second), stats = lowrank.factorize(layer, rank=rank)
    assert first.weight.shape == (rank, 40) and first.bias is None
    assert second.weight.shape == (24, rank)
    approx = second.weight.data.astype(np.float64) @ first.weight.data.astype(np.float64)
    err = np.linalg.norm(w - approx)
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["frobenius_error"], np.sqrt(np.sum(s[rank:] ** 2)),
                               rtol=1e-10)
    assert stats["params_after"] == rank * (40 + 24) + 24
    x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    np.testing.assert_allclose(second(first(x)), x @ approx.T + layer.bias.data,
                               rtol=1e-4, atol=1e-5)


def test_full_rank_factorisation_is_the_same_function():
    layer = Conv2d(3, 8, 3, stride=1, padding=1, seed=1)
    (first, second), stats = lowrank.factorize(layer, rank=8)
    assert first.weight.shape == (8, 3, 3, 3) and second.weight.shape == (8, 8, 1, 1)
    assert stats["frobenius_error"] == pytest.approx(0.0, abs=1e-5)
    x = np.random.default_rng(0).random((2, 3, 7, 7), dtype=np.float32)
    np.testing.assert_allclose(second(first(x)), layer(x), rtol=1e-4, atol=1e-5)


def test_conv_factorisation_error_and_strides():
    layer = Conv2d(4, 16, 3, stride=2, padding=1, seed=2)
    w2d = layer.weight.data.reshape(16, -1).astype(np.float64)
    s = np.linalg.svd(w2d, compute_uv=False)
    (first, second), stats = lowrank.factorize(layer, energy=0.8)
    r = stats["rank"]
    assert np.sum(s[:r] ** 2) >= 0.8 * np.sum(s**2) > np.sum(s[: r - 1] ** 2)
    x = np.random.default_rng(1).random((2, 4, 9, 9), dtype=np.float32)
    y, ref = second(first(x)), layer(x)
    assert y.shape == ref.shape == (2, 16, 5, 5)
    # Per output pixel the error is (W - W_r) applied to a patch: bounded by ||W - W_r||_2 |patch|.
    assert np.abs(y - ref).max() <= s[r] * np.sqrt(4 * 9) + 1e-4


def test_factorize_model_replaces_layers_and_rebuilds_from_spec():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 50, seed=0), nn.ReLU(),
                          nn.Linear(50, 40, seed=1), nn.ReLU(), nn.Linear(40, 10, seed=2))
    report = lowrank.factorize_model(model, "ratio=0.5")
    assert set(report) == {"1", "3"} and all(r["applied"] for r in report.values())
    assert [type(m).__name__ for m in model] == ["Flatten", "Linear", "Linear", "ReLU",
                                                 "Linear", "Linear", "ReLU", "Linear"]
    assert model.num_parameters() < 64 * 50 + 50 * 40 + 40 * 10 + 100
    rebuilt = from_spec(model.to_spec())
    rebuilt.load_state_dict(model.state_dict())
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    np.testing.assert_array_equal(rebuilt(x), model(x))
    assert lowrank.parse_lowrank("3:r=4,5:energy=0.9") == {"3": {"rank": 4},
                                                          "5": {"energy": 0.9}}
    with pytest.raises(ValueError, match="bad low-rank spec"):
        lowrank.parse_lowrank("3:k=2")
    with pytest.raises(ValueError, match="not a Linear"):
        lowrank.factorize_model(model, "0:r=2")


def trained_bn_model():
    model = nn.Sequential(
        Conv2d(2, 6, 3, padding=1, bias=False, seed=1), nn.BatchNorm2d(6), nn.ReLU(),
        MaxPool2d(2), Conv2d(6, 4, 3, padding=1, seed=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 8, seed=3), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 3, seed=4))
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(rng.normal(1.0, 2.0, (16, 2, 8, 8)).astype(np.float32))
    for _, m in model.named_modules():
        if type(m).__name__.startswith("BatchNorm"):
            m.weight.data[...] = rng.uniform(0.5, 2.0, m.num_features)
            m.bias.data[...] = rng.normal(size=m.num_features)
    return model.eval()


def test_batchnorm_folding_is_exact_in_eval_mode():
    model = trained_bn_model()
    x = np.random.default_rng(3).normal(1.0, 2.0, (5, 2, 8, 8)).astype(np.float32)
    ref = model(x).copy()
    folded = fold.fold_batchnorm(model)
    assert len(folded) == 3 and fold.fold_report(model)["batchnorm_layers"] == 0
    assert [type(m).__name__ for m in model] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU",
                                                 "Flatten", "Linear", "ReLU", "Linear"]
    assert model[0].bias is not None  # the folded shift needs a bias
    np.testing.assert_allclose(model(x), ref, rtol=1e-5, atol=1e-5)
    rebuilt = from_spec(model.to_spec())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    np.testing.assert_array_equal(rebuilt(x), model(x))


def test_fold_pair_checks_its_inputs():
    with pytest.raises(TypeError, match="cannot fold"):
        fold.fold_pair(nn.Linear(3, 4), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="outputs"):
        fold.fold_pair(nn.Linear(3, 4), nn.BatchNorm1d(5))
