"""Pruning: magnitude/threshold/global/gradual masks, sensitivity scans, structured pruning."""

import numpy as np
import pytest

from compression import prune, sensitivity, structured
from distnet import nn
from distnet.nn.conv import Conv2d
from distnet.nn.module import from_spec
from distnet.nn.pool import MaxPool2d
from distnet.optim import build_optimizer


def mlp(seed=0):
    return nn.Sequential(nn.Linear(20, 30, seed=seed), nn.ReLU(), nn.Linear(30, 16, seed=seed + 1),
                         nn.ReLU(), nn.Linear(16, 4, seed=seed + 2))


def test_amount_validation():
    assert prune.validate_amount(0.25, 100) == 25
    assert prune.validate_amount(7, 100) == 7
    for bad, err in [(True, TypeError), ("0.5", TypeError), (-1, ValueError), (101, ValueError),
                     (1.5, ValueError), (-0.1, ValueError)]:
        with pytest.raises(err):
            prune.validate_amount(bad, 100)
    p = nn.Linear(4, 4).weight
    with pytest.raises(ValueError, match="exactly one"):
        prune.prune_param(p)
    with pytest.raises(ValueError, match="exactly one"):
        prune.prune_param(p, 0.5, q=1.0)


@pytest.mark.parametrize("amount, count", [(0.3, 180), (37, 37), (0, 0), (1.0, 600)])
def test_magnitude_pruning_removes_exactly_the_smallest(amount, count):
    p = nn.Linear(20, 30, seed=3).weight
    before = p.data.copy()
    prune.prune_param(p, amount)
    assert int((p.mask == 0).sum()) == count
    if 0 < count < p.size:
        assert np.abs(before[p.mask == 0]).max() <= np.abs(before[p.mask == 1]).min()
    np.testing.assert_array_equal(p.data, before * p.mask)


def test_ties_still_prune_an_exact_count():
    p = nn.Linear(10, 10).weight
    p.data[...] = 1.0
    prune.prune_param(p, 0.37)
    assert int((p.mask == 0).sum()) == 37


def test_repeated_pruning_combines_masks():
    p = nn.Linear(20, 30, seed=4).weight
    prune.prune_param(p, 0.5)
    first = p.mask.copy()
    prune.prune_param(p, 0.8)
    assert prune.sparsity(p) == pytest.approx(0.8)
    assert np.all(p.mask <= first)  # only more zeros
    prune.prune_param(p, 0.3)  # a lower target never revives weights
    assert prune.sparsity(p) == pytest.approx(0.8)


def test_pruned_weights_stay_zero_after_momentum_steps():
    model = mlp()
    prune.prune_model(model, 0.7)
    opt = build_optimizer("momentum", model, lr=0.1, weight_decay=1e-3)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 20)).astype(np.float32), rng.integers(0, 4, 32)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(5):
        loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        for p in model.parameters():
            p.grad += 1.0  # gradients on the pruned entries too
        opt.step()
    for name, p in prune.prunable(model).items():
        assert np.all(p.data[p.mask == 0] == 0), name
        assert np.any(p.data[p.mask == 1] != 0), name


def test_threshold_pruning_uses_q_times_std():
    p = nn.Linear(50, 40, seed=5).weight
    w = p.data.copy()
    prune.prune_param(p, q=0.8)
    thr = 0.8 * w.std()
    np.testing.assert_array_equal(p.mask == 0, np.abs(w) < thr)


def test_biases_are_left_alone_by_default_and_specs_resolve():
    model = mlp()
    reached = prune.prune_model(model, "2:0.9,#2:0.5")
    assert reached == {"2.weight": pytest.approx(0.9), "4.weight": pytest.approx(0.5)}
    assert all(p.mask is None for n, p in model.named_parameters() if n.endswith("bias"))
    assert prune.parse_spec("q=1.1") == {"q": 1.1}
    assert prune.parse_spec("0:0.9, 2:q0.7") == {"0": 0.9, "2": ("q", 0.7)}
    assert set(prune.prune_model(mlp(), "q=1.0")) == {"0.weight", "2.weight", "4.weight"}
    with pytest.raises(KeyError, match="no prunable layer"):
        prune.prune_model(mlp(), {"1": 0.5})
    with pytest.raises(ValueError, match="not a pruning amount"):
        prune.parse_spec("lots")


def test_global_pruning_uses_one_threshold():
    model = mlp()
    weights = {n: p.data.copy() for n, p in prune.prunable(model).items()}
    reached = prune.global_prune(model, 0.6)
    total = sum(p.size for p in prune.prunable(model).values())
    zeros = sum(int((p.mask == 0).sum()) for p in prune.prunable(model).values())
    assert zeros == round(0.6 * total)
    params = prune.prunable(model)
    gone = max(np.abs(weights[n][params[n].mask == 0]).max() for n in params)
    kept = min(np.abs(weights[n][params[n].mask == 1]).min() for n in params)
    assert gone <= kept
    assert len(set(round(v, 3) for v in reached.values())) > 1  # layers differ


def test_agp_schedule_and_gradual_pruning():
    s = [prune.agp_sparsity(t, 0.9, 0.0, 0, 10) for t in range(12)]
    assert s[0] == 0.0 and s[10] == pytest.approx(0.9) and s[11] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(s, s[1:], strict=False))
    assert s[1] - s[0] > s[9] - s[8]  # prunes fast first, slowly at the end (cubic)
    model = mlp()
    rounds, seen = [], []
    reached = prune.gradual_prune(model, {"0.weight": 0.9, "2.weight": 0.8}, steps=4,
                                  retrain=rounds.append, on_step=lambda k, r: seen.append(r))
    assert rounds == [1, 2, 3, 4]
    assert reached["0.weight"] == pytest.approx(0.9) and reached["2.weight"] == pytest.approx(0.8)
    assert seen[0]["0.weight"] < seen[1]["0.weight"] < seen[3]["0.weight"]


def test_sensitivity_scan_restores_the_model_and_proposes():
    model = mlp()
    prune.prune_param(model[0].weight, 0.2)
    before = model.state_dict()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 20)).astype(np.float32)
    ref = model.forward(x).copy()

    def score(m):  # agreement with the unpruned outputs: falls as layers are pruned
        return float(np.mean(np.argmax(m.forward(x), 1) == np.argmax(ref, 1)))

    scan = sensitivity.sensitivity_scan(model, score, [0.3, 0.6, 0.9], progress=False)
    after = model.state_dict()
    assert sorted(before) == sorted(after)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert scan["baseline"] == 1.0 and set(scan["layers"]) == {"0.weight", "2.weight", "4.weight"}
    proposal = sensitivity.propose_sparsities(scan, tolerance=0.05)
    for name, curve in scan["layers"].items():
        ok = [s for s, v in curve if v >= 1.0 - 0.05]
        assert proposal[name] <= max(ok, default=0.0)
    assert "baseline" in sensitivity.format_scan(scan)


def test_structured_pruning_of_dead_neurons_keeps_outputs():
    model = mlp()
    dead = [1, 5, 7, 20]
    model[0].weight.data[dead] = 0  # these units output relu(0) = 0 whatever the input
    model[0].bias.data[dead] = -1.0
    x = np.random.default_rng(0).normal(size=(16, 20)).astype(np.float32)
    ref = model.forward(x).copy()
    keep = structured.prune_units(model, 0, len(dead))
    assert set(keep).isdisjoint(dead) and model[0].weight.shape == (26, 20)
    assert model[2].weight.shape == (16, 26)
    np.testing.assert_allclose(model.forward(x), ref, rtol=1e-5, atol=1e-6)
    rebuilt = from_spec(model.to_spec())
    rebuilt.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(rebuilt.forward(x), model.forward(x))
    with pytest.raises(ValueError, match="last layer"):
        structured.prune_units(model, 4, 1)


def test_structured_pruning_of_conv_filters_slices_bn_and_flatten():
    model = nn.Sequential(Conv2d(2, 6, 3, padding=1, seed=1), nn.BatchNorm2d(6), nn.ReLU(),
                          MaxPool2d(2), Conv2d(6, 5, 3, padding=1, seed=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 4 * 4, 3, seed=3))
    model.eval()
    bn = model[1]
    bn.running_mean[...] = np.arange(6)
    x = np.random.default_rng(0).random((4, 2, 8, 8), dtype=np.float32)
    model[0].weight.data[[0, 3]] = 0  # filters 0 and 3 are dead: BN maps them to a constant...
    bn.weight.data[[0, 3]] = 0  # ...of beta = 0, i.e. nothing reaches the next conv
    ref = model.forward(x).copy()
    keep = structured.prune_units(model, 0, 2)
    np.testing.assert_array_equal(keep, [1, 2, 4, 5])
    assert model[0].weight.shape == (4, 2, 3, 3) and model[1].num_features == 4
    np.testing.assert_array_equal(model[1].running_mean, [1, 2, 4, 5])
    assert model[4].weight.shape == (5, 4, 3, 3)
    np.testing.assert_allclose(model.forward(x), ref, rtol=1e-5, atol=1e-6)
    model[4].weight.data[[2]] = 0  # conv -> flatten -> linear: blocks of 16 columns go
    model[4].bias.data[[2]] = -1.0
    ref = model.forward(x).copy()
    structured.prune_units(model, 4, 1)
    assert model[7].weight.shape == (3, 4 * 16)
    np.testing.assert_allclose(model.forward(x), ref, rtol=1e-5, atol=1e-6)
