"""Module plumbing with real layers: state_dict, masks, specs, train/eval."""

from __future__ import annotations

import importlib.util
import inspect
import json

import numpy as np
import pytest

from distnet import nn

HAVE_CONV = importlib.util.find_spec("distnet.nn.conv") is not None

# One instance of every layer and loss this package defines, with non-default arguments
# so that a config that forgot one would show.
LAYERS = {
    "Linear": lambda: nn.Linear(6, 4, bias=False, seed=3),
    "ReLU": nn.ReLU,
    "LeakyReLU": lambda: nn.LeakyReLU(0.2),
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "Softmax": lambda: nn.Softmax(dim=1),
    "Flatten": nn.Flatten,
    "Normalize": lambda: nn.Normalize([[[0.1]], [[0.2]]], [[[0.3]], [[0.4]]]),
    "Dropout": lambda: nn.Dropout(0.25, seed=2),
    "BatchNorm1d": lambda: nn.BatchNorm1d(5, eps=1e-3, momentum=0.2),
    "BatchNorm2d": lambda: nn.BatchNorm2d(3, eps=1e-4, momentum=0.05),
    "LSTM": lambda: nn.LSTM(3, 4, num_layers=2, batch_first=False, seed=1),
    "ResidualBlock": lambda: nn.ResidualBlock(2, 4, stride=2, seed=5),
    "CrossEntropyLoss": nn.CrossEntropyLoss,
    "MSELoss": nn.MSELoss,
    "MultiMarginLoss": lambda: nn.MultiMarginLoss(p=2, margin=0.5),
}
MY_FILES = {"activation", "dropout", "linear", "loss", "normalization", "recurrent",
            "residual", "shape"}


def test_every_layer_type_is_covered():
    mine = {name for name, cls in vars(nn).items()
            if inspect.isclass(cls) and issubclass(cls, nn.Module)
            and cls.__module__.rsplit(".", 1)[-1] in MY_FILES and not name.startswith("_")}
    assert mine - {"Loss"} == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_spec_round_trip(name):
    if name == "ResidualBlock" and not HAVE_CONV:
        pytest.skip("Conv2d (distnet/nn/conv.py) not there")
    module = LAYERS[name]()
    spec = json.loads(json.dumps(module.to_spec()))  # JSON-able, and survives a round trip
    rebuilt = nn.from_spec(spec)
    assert type(rebuilt) is type(module)
    assert rebuilt.to_spec() == spec
    ours, theirs = module.state_dict(), rebuilt.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        if "seed" in module.get_config() or not module.parameters():
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def mlp(seed=0):
    return nn.Sequential(nn.Normalize(0.5, 0.2), nn.Linear(6, 8, seed=seed), nn.BatchNorm1d(8),
                         nn.ReLU(), nn.Dropout(0.5, seed=seed), nn.Linear(8, 3, seed=seed + 1))


def _train_a_little(model):
    x = np.random.default_rng(0).random((16, 6), dtype=np.float32)
    for _ in range(3):
        model.forward(x)  # updates the batch-norm running statistics
    for p in model.parameters():
        p.data += 0.1
    return x


def test_state_dict_round_trip():
    model = mlp(0)
    x = _train_a_little(model)
    model.parameters()[0].set_mask(np.random.default_rng(1).random((8, 6)) > 0.5)
    state = model.state_dict()
    assert set(state) == {"0.mean", "0.std", "1.weight", "1.weight_mask", "1.bias",
                          "2.weight", "2.bias", "2.running_mean", "2.running_var",
                          "5.weight", "5.bias"}
    state["5.bias"][0] = 123.0  # host copies: editing them leaves the model alone
    assert model.parameters()[-1].data[0] != 123.0
    state = model.state_dict()
    other = mlp(7)
    refs = [p.data for p in other.parameters()]
    other.load_state_dict(state)
    assert all(p.data is r for p, r in zip(other.parameters(), refs, strict=True))  # in place
    np.testing.assert_array_equal(other.parameters()[0].mask, state["1.weight_mask"])
    model.eval()
    other.eval()
    np.testing.assert_array_equal(model.forward(x), other.forward(x))


def test_load_state_dict_errors_change_nothing():
    model = mlp(0)
    before = model.state_dict()
    bad = dict(before)
    del bad["2.running_var"]
    bad["extra"] = np.zeros(2, np.float32)
    with pytest.raises(KeyError, match=r"missing \['2.running_var'\], unexpected \['extra'\]"):
        model.load_state_dict(bad)
    wrong = {k: v + 1 for k, v in before.items()}
    wrong["5.weight"] = np.zeros((3, 9), np.float32)
    with pytest.raises(ValueError, match=r"5.weight: shape \(3, 9\) in the state, \(3, 8\)"):
        model.load_state_dict(wrong)
    after = model.state_dict()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    partial = {"5.bias": np.full(3, 2.0, np.float32)}
    model.load_state_dict(partial, strict=False)
    np.testing.assert_array_equal(model.parameters()[-1].data, partial["5.bias"])


def test_normalize_config_follows_loaded_buffers():
    norm = nn.Normalize()
    norm.load_state_dict({"mean": np.float32(0.13), "std": np.float32(0.31)})
    config = nn.from_spec(json.loads(json.dumps(norm.to_spec()))).get_config()
    assert config == pytest.approx({"mean": 0.13, "std": 0.31})


def test_train_and_eval_modes():
    model = mlp(0)
    x = np.random.default_rng(0).random((16, 6), dtype=np.float32)
    bn, drop = model[2], model[4]
    assert all(m.training for _, m in model.named_modules())
    stats = bn.running_mean.copy()
    out_train = model.forward(x).copy()
    assert not np.array_equal(bn.running_mean, stats)  # training updates the statistics
    assert not np.array_equal(out_train, model.forward(x))  # a new dropout mask
    model.eval()
    assert not any(m.training for _, m in model.named_modules())
    stats = bn.running_mean.copy()
    out = model.forward(x).copy()
    np.testing.assert_array_equal(bn.running_mean, stats)  # eval leaves them alone
    np.testing.assert_array_equal(model.forward(x), out)  # and is deterministic
    np.testing.assert_array_equal(model.forward(x[:4]), out[:4])  # per example, not per batch
    assert drop.forward(x) is x
    model.train()
    assert all(m.training for _, m in model.named_modules())


def test_to_cpu_and_sequential_backward():
    model = mlp(0).to("cpu")
    assert model.device == "cpu"
    x = np.random.default_rng(0).random((4, 6), dtype=np.float32)
    y = model.forward(x)
    grad = model.backward(np.ones_like(y))
    assert grad.shape == x.shape and grad.dtype == np.float32
    assert all(p.grad.shape == p.shape for p in model.parameters())


def test_rebinding_a_buffer_keeps_it_registered():
    from distnet.nn import BatchNorm1d

    bn = BatchNorm1d(3)
    bn.running_mean = bn.running_mean + 1.0
    assert "running_mean" in bn.state_dict()
    assert bn.state_dict()["running_mean"].tolist() == [1.0, 1.0, 1.0]


def test_sequential_setitem_keeps_the_layer_order():
    from distnet.nn import Linear, ReLU, Sequential, Tanh

    model = Sequential(Linear(4, 3), ReLU(), Linear(3, 2))
    model[1] = Tanh()
    assert [type(m).__name__ for m in model] == ["Linear", "Tanh", "Linear"]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.weight",
                                                         "2.bias"]
