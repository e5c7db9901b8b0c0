"""Dense layers, activations, normalisation, dropout, residual blocks and initialisers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import check_module

from distnet import nn
from distnet.nn import init


def away_from_zero(shape, seed=0):
    """Random values with |x| >= 0.1: central differences must not straddle a kink."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ---- gradient checks (float64) ------------------------------------------------------

GRADCHECK = [
    ("linear", lambda: nn.Linear(7, 5, seed=1), (4, 7)),
    ("linear-nobias", lambda: nn.Linear(7, 5, bias=False, seed=1), (4, 7)),
    ("relu", nn.ReLU, (4, 6)),
    ("leaky_relu", lambda: nn.LeakyReLU(0.2), (4, 6)),
    ("sigmoid", nn.Sigmoid, (4, 6)),
    ("tanh", nn.Tanh, (4, 6)),
    ("softmax", nn.Softmax, (4, 6)),
    ("softmax-dim1", lambda: nn.Softmax(dim=1), (3, 4, 5)),
    ("flatten", nn.Flatten, (3, 2, 4, 5)),
    ("normalize-scalar", lambda: nn.Normalize(0.5, 0.25), (3, 2, 4, 4)),
    ("normalize-channel", lambda: nn.Normalize([[[0.1]], [[0.2]]], [[[0.5]], [[2.0]]]),
     (3, 2, 4, 4)),
    ("batchnorm1d", lambda: nn.BatchNorm1d(6), (5, 6)),
    ("batchnorm1d-seq", lambda: nn.BatchNorm1d(3), (4, 3, 5)),
    ("batchnorm2d", lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
]


def _randomise(module, seed=3):
    """Non-trivial BN affine parameters and running statistics."""
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.data[...] = rng.uniform(0.5, 1.5, p.shape)
    for name, b in module.named_buffers():
        if name.endswith("running_var"):
            b[...] = rng.uniform(0.5, 2.0, b.shape)
        elif name.endswith("running_mean"):
            b[...] = rng.standard_normal(b.shape)
    return module


# Eval mode differs from training only for batch norm (running statistics).
GRADCHECK_MODES = [(*g, "train") for g in GRADCHECK] + [
    (*g, "eval") for g in GRADCHECK if g[0].startswith("batchnorm")]


@pytest.mark.parametrize("name,make,shape,mode", GRADCHECK_MODES,
                         ids=[f"{g[0]}-{g[3]}" for g in GRADCHECK_MODES])
def test_gradcheck(name, make, shape, mode):
    module = _randomise(make())
    module.train(mode == "train")
    check_module(module, away_from_zero(shape))


def test_gradcheck_dropout_with_fixed_mask():
    drop = nn.Dropout(0.4, seed=0)
    check_module(drop, away_from_zero((6, 8)), before_forward=lambda: drop.reseed(7))


def test_gradcheck_mlp():
    model = nn.Sequential(nn.Normalize(0.2, 0.5), nn.Linear(6, 8, seed=0), nn.Tanh(),
                          nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Linear(8, 3, seed=1))
    check_module(model, randn(5, 6))


def _conv():
    return pytest.importorskip("distnet.nn.conv", reason="Conv2d (distnet/nn/conv.py) not there")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cin,cout,stride", [(3, 3, 1), (2, 4, 2), (3, 4, 1)])
def test_gradcheck_residual_block(cin, cout, stride, mode):
    _conv()
    block = _randomise(nn.ResidualBlock(cin, cout, stride=stride, seed=0))
    assert ("shortcut" in block._modules) == (cin != cout or stride != 1)
    if mode == "eval":
        block.eval()
    check_module(block, randn(2, cin, 5, 5), max_checks=25)
    out = block.forward(randn(2, cin, 5, 5))
    assert out.shape == (2, cout, math.ceil(5 / stride), math.ceil(5 / stride))


def test_residual_block_error_names_shape():
    _conv()
    with pytest.raises(ValueError, match=r"ResidualBlock\(3, 4\): expected input \(N, 3, H, W\)"):
        nn.ResidualBlock(3, 4).forward(np.zeros((2, 5, 4, 4), np.float32))


# ---- against PyTorch ----------------------------------------------------------------

TORCH = [
    ("linear", lambda: nn.Linear(7, 5), lambda t: t.nn.Linear(7, 5), (6, 7), "train"),
    ("relu", nn.ReLU, lambda t: t.nn.ReLU(), (4, 9), "train"),
    ("leaky_relu", lambda: nn.LeakyReLU(0.3), lambda t: t.nn.LeakyReLU(0.3), (4, 9), "train"),
    ("sigmoid", nn.Sigmoid, lambda t: t.nn.Sigmoid(), (4, 9), "train"),
    ("tanh", nn.Tanh, lambda t: t.nn.Tanh(), (4, 9), "train"),
    ("softmax", nn.Softmax, lambda t: t.nn.Softmax(dim=-1), (4, 9), "train"),
    ("flatten", nn.Flatten, lambda t: t.nn.Flatten(), (4, 2, 3, 3), "train"),
    ("bn1d-train", lambda: nn.BatchNorm1d(6), lambda t: t.nn.BatchNorm1d(6), (8, 6), "train"),
    ("bn1d-eval", lambda: nn.BatchNorm1d(6), lambda t: t.nn.BatchNorm1d(6), (8, 6), "eval"),
    ("bn1d-seq", lambda: nn.BatchNorm1d(3), lambda t: t.nn.BatchNorm1d(3), (4, 3, 5), "train"),
    ("bn2d-train", lambda: nn.BatchNorm2d(3), lambda t: t.nn.BatchNorm2d(3), (4, 3, 5, 5),
     "train"),
    ("bn2d-eval", lambda: nn.BatchNorm2d(3), lambda t: t.nn.BatchNorm2d(3), (4, 3, 5, 5),
     "eval"),
]


def compare_with_torch(ours, theirs, x, mode, rtol=1e-4, atol=1e-5):
    """Copy our parameters/buffers into ``theirs``; compare outputs, grads and buffers."""
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            theirs.get_parameter(name).copy_(torch.from_numpy(p.data))
        for name, b in ours.named_buffers():
            theirs.get_buffer(name).copy_(torch.from_numpy(np.asarray(b)))
    ours.train(mode == "train")
    theirs.train(mode == "train")
    x = np.asarray(x, dtype=np.float32)
    y = ours.forward(x)
    g = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    grad_x = ours.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    ty.backward(torch.from_numpy(g))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=rtol, atol=atol, err_msg="forward")
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), rtol=rtol, atol=atol, err_msg="grad x")
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, theirs.get_parameter(name).grad.numpy(), rtol=rtol,
                                   atol=atol, err_msg=f"grad {name}")
    for name, b in ours.named_buffers():
        np.testing.assert_allclose(b, theirs.get_buffer(name).numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"buffer {name}")


@pytest.mark.parametrize("name,make,make_torch,shape,mode", TORCH, ids=[t[0] for t in TORCH])
def test_against_torch(name, make, make_torch, shape, mode):
    torch = pytest.importorskip("torch")
    compare_with_torch(_randomise(make()), make_torch(torch), randn(*shape), mode)


def _torch_residual(torch, cin, cout, stride):
    """The same block in PyTorch, with our child names so parameters map one to one."""
    tnn = torch.nn

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1, self.relu1 = tnn.BatchNorm2d(cout), tnn.ReLU()
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2, self.relu2 = tnn.BatchNorm2d(cout), tnn.ReLU()
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, 0, bias=False),
                                               tnn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            return self.relu2(y + (x if self.shortcut is None else self.shortcut(x)))

    return Block()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cin,cout,stride", [(3, 3, 1), (2, 4, 2)])
def test_residual_block_against_torch(cin, cout, stride, mode):
    torch = pytest.importorskip("torch")
    _conv()
    block = _randomise(nn.ResidualBlock(cin, cout, stride=stride, seed=0))
    compare_with_torch(block, _torch_residual(torch, cin, cout, stride), randn(2, cin, 6, 6),
                       mode, atol=1e-4)


# ---- behaviour ----------------------------------------------------------------------

def test_linear_error_names_layer_and_shapes():
    with pytest.raises(ValueError, match=r"Linear\(784, 300\): expected input \(N, 784\), "
                                         r"got \(128, 64\)"):
        nn.Linear(784, 300).forward(np.zeros((128, 64), np.float32))


def test_batchnorm_and_normalize_errors():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): expected input \(N, 3, H, W\), "
                                         r"got \(2, 4, 5, 5\)"):
        nn.BatchNorm2d(3).forward(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): expected input \(N, 3\) or"):
        nn.BatchNorm1d(3).forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="more than one value per channel"):
        nn.BatchNorm1d(3).forward(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"Normalize.*got \(2, 3, 5\)"):
        nn.Normalize(np.zeros((3, 1, 1)), 1.0).forward(np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="std must be non-zero"):
        nn.Normalize(0.0, 0.0)
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Linear(2, 3).backward(np.zeros((1, 3), np.float32))


def test_linear_default_init_like_torch():
    layer = nn.Linear(400, 30, seed=5)
    bound = 1 / math.sqrt(400)
    assert layer.weight.data.dtype == np.float32 and layer.weight.shape == (30, 400)
    assert np.abs(layer.weight.data).max() <= bound and np.abs(layer.bias.data).max() <= bound
    assert np.abs(layer.weight.data).max() > 0.95 * bound  # uniform over the whole range
    np.testing.assert_array_equal(layer.weight.data, nn.Linear(400, 30, seed=5).weight.data)
    assert not np.array_equal(layer.weight.data, nn.Linear(400, 30, seed=6).weight.data)


def test_workspaces_reused_and_grads_written_in_place():
    layer, relu = nn.Linear(5, 4, seed=0), nn.ReLU()
    x, g = randn(3, 5).astype(np.float32), randn(3, 4).astype(np.float32)
    weight_grad = layer.weight.grad
    outs = [relu.forward(layer.forward(x)).__array_interface__["data"][0] for _ in range(2)]
    assert outs[0] == outs[1]
    first = layer.backward(relu.backward(g)).copy()
    grads = layer.weight.grad.copy()
    second = layer.backward(relu.backward(g))
    assert layer.weight.grad is weight_grad  # written in place: optimizers keep references
    np.testing.assert_array_equal(layer.weight.grad, grads)  # written, not accumulated
    np.testing.assert_array_equal(first, second)


def test_normalize_identity_is_free_and_buffers_apply():
    x = randn(2, 1, 3, 3).astype(np.float32)
    ident = nn.Normalize()
    assert ident.forward(x) is x and ident.backward(x) is x
    norm = nn.Normalize(0.5, 2.0)
    np.testing.assert_allclose(norm.forward(x), (x - 0.5) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(norm.backward(x), x / 2.0, rtol=1e-6)


def test_flatten_is_a_view():
    x = np.zeros((2, 3, 4), np.float32)
    flat = nn.Flatten()
    y = flat.forward(x)
    assert y.shape == (2, 12) and np.shares_memory(x, y)
    assert flat.backward(y).shape == (2, 3, 4)


def test_dropout_behaviour():
    x = np.ones((200, 50), np.float32)
    a, b = nn.Dropout(0.3, seed=1), nn.Dropout(0.3, seed=1)
    ya = a.forward(x).copy()
    np.testing.assert_array_equal(ya, b.forward(x))  # same seed, same mask
    assert set(np.unique(ya)) == {0.0, np.float32(1 / 0.7)}
    assert abs((ya == 0).mean() - 0.3) < 0.02 and abs(ya.mean() - 1.0) < 0.03
    np.testing.assert_array_equal(a.backward(x), ya)  # same mask and scale
    assert not np.array_equal(a.forward(x), ya)  # a fresh mask each step
    a.eval()
    assert a.forward(x) is x and a.backward(x) is x
    assert not nn.Dropout(1.0).forward(x).any()
    assert nn.Dropout(0.0).forward(x) is x
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        nn.Dropout(1.5)


def test_skip_input_grad_stops_at_first_parametrised_layer():
    def lenet():
        return nn.Sequential(nn.Normalize(0.1, 0.3), nn.Flatten(), nn.Linear(16, 8, seed=0),
                             nn.ReLU(), nn.Linear(8, 3, seed=1))
    full, skip = lenet(), lenet()
    assert nn.skip_input_grad(skip) == ["0", "1", "2"]
    x, g = randn(4, 1, 4, 4).astype(np.float32), randn(4, 3).astype(np.float32)
    full.forward(x)
    assert full.backward(g).shape == x.shape
    skip.forward(x)
    assert skip.backward(g) is None
    for (name, p), q in zip(full.named_parameters(), skip.parameters(), strict=True):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)


# ---- initialisers -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(30, 20), (16, 3, 5, 5)])
def test_init_fans_and_gains_like_torch(shape):
    torch = pytest.importorskip("torch")
    t = torch.empty(shape)
    assert init.fans(shape) == torch.nn.init._calculate_fan_in_and_fan_out(t)
    for nonlin, param in [("relu", None), ("tanh", None), ("leaky_relu", math.sqrt(5)),
                          ("sigmoid", None), ("linear", None)]:
        assert init.calculate_gain(nonlin, param) == pytest.approx(
            torch.nn.init.calculate_gain(nonlin, param))


@pytest.mark.parametrize("shape", [(300, 200), (64, 16, 3, 3)])
def test_init_distributions(shape):
    fan_in, fan_out = init.fans(shape)
    cases = [
        (init.xavier_uniform(shape, rng=0), math.sqrt(6 / (fan_in + fan_out)), "uniform"),
        (init.xavier_normal(shape, rng=0), math.sqrt(2 / (fan_in + fan_out)), "normal"),
        (init.kaiming_uniform(shape, rng=0), math.sqrt(2) * math.sqrt(3 / fan_in), "uniform"),
        (init.kaiming_normal(shape, nonlinearity="relu", mode="fan_out", rng=0),
         math.sqrt(2 / fan_out), "normal"),
    ]
    for w, scale, kind in cases:
        assert w.dtype == np.float32 and w.shape == shape
        if kind == "uniform":
            assert np.abs(w).max() <= scale and np.abs(w).max() > 0.95 * scale
        else:
            assert w.std() == pytest.approx(scale, rel=0.05) and abs(w.mean()) < 0.1 * scale
    gen = np.random.default_rng(4)
    np.testing.assert_array_equal(init.xavier_uniform(shape, rng=gen),
                                  init.xavier_uniform(shape, rng=np.random.default_rng(4)))
    z = init.zeros(shape)
    assert z.dtype == np.float32 and not z.any()
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.xavier_uniform((5,))
