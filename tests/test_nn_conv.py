"""Conv2d, MaxPool2d and AvgPool2d: float64 gradient checks, PyTorch equality, specs, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from gradcheck import check_module

from distnet import backend
from distnet.nn.conv import Conv2d
from distnet.nn.module import Sequential, from_spec
from distnet.nn.pool import AvgPool2d, MaxPool2d


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _nhwc(x: np.ndarray) -> np.ndarray:
    """The same logical (N, C, H, W) array, stored channels-last (what Conv2d emits)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _distinct(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values at least 0.01 apart: no ties in any max-pool window, even when perturbed."""
    size = math.prod(shape)
    return (_rng(seed).permutation(size).reshape(shape) * 0.01 - size * 0.005).astype(np.float64)


# ---- gradient checks (float64) --------------------------------------------------------------

# (in, out, kernel, stride, padding, bias, H, W, blocks)
CONV_CASES = [
    (1, 3, 3, 1, 0, True, 6, 6, None),
    (2, 3, 3, 2, 1, True, 7, 7, None),
    (3, 2, (3, 2), (2, 1), (1, 2), False, 6, 5, None),
    (2, 4, 5, 1, 2, True, 5, 6, None),
    (3, 2, 1, 1, 0, True, 4, 4, None),
    (2, 3, (2, 3), (1, 2), 0, True, 5, 9, None),
    (2, 3, 3, 1, 1, True, 4, 6, (1, 1)),  # plain im2col / col2im
    (2, 3, 3, 1, 1, True, 4, 6, (2, 3)),  # blocked
    (1, 2, 3, 2, 0, False, 7, 13, (6, 2)),  # blocked with stride 2
    (2, 2, (3, 2), (1, 3), 1, True, 5, 8, (3, 1)),  # stride > kernel width
]


@pytest.mark.parametrize("cin,cout,k,s,p,bias,h,w,blocks", CONV_CASES)
def test_conv_gradcheck(cin, cout, k, s, p, bias, h, w, blocks):
    conv = Conv2d(cin, cout, k, stride=s, padding=p, bias=bias, seed=1)
    conv.blocks = blocks
    check_module(conv, _rng(2).standard_normal((2, cin, h, w)))


@pytest.mark.parametrize("k,s,p,h,w", [
    (2, None, 0, 6, 8),        # non-overlapping, tiles the input
    (2, 2, 0, 7, 5),           # non-overlapping, leftover rows/columns
    (3, 1, 1, 5, 6),           # overlapping, padded
    ((3, 2), (2, 1), (1, 0), 7, 6),
])
def test_maxpool_gradcheck(k, s, p, h, w):
    check_module(MaxPool2d(k, s, p), _distinct((2, 3, h, w)))


@pytest.mark.parametrize("k,s,p,include", [
    (2, None, 0, True), (3, 2, 1, True), (3, 2, 1, False), ((3, 2), 1, (1, 1), False),
])
def test_avgpool_gradcheck(k, s, p, include):
    check_module(AvgPool2d(k, s, p, count_include_pad=include),
                 _rng(5).standard_normal((2, 3, 7, 6)))


# ---- equality with PyTorch ----------------------------------------------------------------

TORCH_CONV = [
    # (N, in, out, kernel, stride, padding, bias, H, W, channels_last_input, blocks)
    (128, 1, 20, 5, 1, 0, True, 28, 28, False, None),   # LeNet-5 conv1
    (128, 20, 50, 5, 1, 0, True, 12, 12, True, None),   # LeNet-5 conv2
    (4, 3, 8, 3, 1, 1, False, 9, 10, False, None),
    (4, 3, 8, 3, 2, 1, True, 9, 10, True, None),
    (3, 4, 5, (3, 5), (2, 1), (0, 2), True, 11, 7, False, None),
    (3, 16, 16, 3, 1, 1, False, 8, 8, True, (4, 8)),
    (3, 16, 16, 3, 1, 1, False, 8, 8, True, (8, 1)),
    (3, 16, 32, 1, 2, 0, False, 8, 8, False, None),
    (2, 2, 3, 4, 4, 0, True, 12, 12, False, None),      # patchify: stride == kernel
]


@pytest.mark.parametrize("n,cin,cout,k,s,p,bias,h,w,last,blocks", TORCH_CONV)
def test_conv_matches_torch(n, cin, cout, k, s, p, bias, h, w, last, blocks):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = _rng(6)
    conv = Conv2d(cin, cout, k, stride=s, padding=p, bias=bias, seed=7)
    conv.blocks = blocks
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    y = conv.forward(_nhwc(x) if last else x)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(conv.weight.data, requires_grad=True)
    tb = torch.tensor(conv.bias.data, requires_grad=True) if bias else None
    ty = F.conv2d(tx, tw, tb, s, p)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-4, atol=1e-4)
    g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    ty.backward(torch.tensor(g))
    gx = conv.backward(g)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-4, atol=1e-4)
    # float32 sums over N*OH*OW terms: the error grows with the largest entry
    for ours, ref in [(conv.weight.grad, tw.grad)] + ([(conv.bias.grad, tb.grad)] if bias else []):
        ref = ref.numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=3e-5 * np.abs(ref).max())


TORCH_POOL = [
    # (kind, kernel, stride, padding, count_include_pad, H, W, channels_last_input, ties)
    ("max", 2, None, 0, True, 24, 24, True, False),
    ("max", 2, None, 0, True, 8, 8, False, True),
    ("max", 2, 2, 0, True, 7, 9, True, False),
    ("max", 3, 2, 1, True, 9, 8, False, False),
    ("max", 3, 1, 1, True, 6, 6, True, True),
    ("max", (2, 3), (1, 2), (1, 1), True, 8, 9, False, False),
    ("avg", 2, None, 0, True, 24, 24, True, False),
    ("avg", 3, 2, 1, True, 9, 8, False, False),
    ("avg", 3, 2, 1, False, 9, 8, True, False),
    ("avg", (2, 3), (1, 2), (1, 1), False, 8, 9, False, False),
    ("avg", (4, 3), None, 0, True, 8, 7, True, False),
]


@pytest.mark.parametrize("kind,k,s,p,include,h,w,last,ties", TORCH_POOL)
def test_pool_matches_torch(kind, k, s, p, include, h, w, last, ties):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = _rng(8)
    shape = (4, 5, h, w)
    if ties:  # after a ReLU many windows hold several zeros: the gradient goes to the first
        x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    if kind == "max":
        layer = MaxPool2d(k, s, p)
        ty = F.max_pool2d(tx, k, s, p)
    else:
        layer = AvgPool2d(k, s, p, count_include_pad=include)
        ty = F.avg_pool2d(tx, k, s, p, count_include_pad=include)
    for _ in range(2):  # the second pass reuses the workspaces
        y = layer.forward(_nhwc(x) if last else x)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-6, atol=1e-6)
        g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
        tx.grad = None
        ty.backward(torch.tensor(g), retain_graph=True)
        np.testing.assert_allclose(layer.backward(g), tx.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_lenet_stack_matches_torch():
    """conv -> pool -> conv -> pool: each layer consumes the previous one's NHWC views."""
    torch = pytest.importorskip("torch")
    rng = _rng(9)
    ours = [Conv2d(1, 6, 5, seed=1), MaxPool2d(2), Conv2d(6, 8, 3, padding=1, seed=2),
            AvgPool2d(2)]
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.AvgPool2d(2))
    with torch.no_grad():
        for i in (0, 2):
            ref[i].weight.copy_(torch.from_numpy(ours[i].weight.data))
            ref[i].bias.copy_(torch.from_numpy(ours[i].bias.data))
    model = Sequential(*ours)
    x = rng.random((6, 1, 16, 16), dtype=np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = ref(tx)
    np.testing.assert_allclose(model.forward(x), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(model.backward(g), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    for i in (0, 2):
        np.testing.assert_allclose(ours[i].weight.grad, ref[i].weight.grad.numpy(), rtol=1e-4,
                                   atol=1e-4)


# ---- specs, init, flags, errors --------------------------------------------------------------

def test_spec_round_trip():
    model = Sequential(Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), bias=False, seed=3),
                       MaxPool2d(2), Conv2d(4, 5, 3, padding=1, seed=4),
                       MaxPool2d(3, stride=1, padding=1),
                       AvgPool2d((2, 1), count_include_pad=False))
    spec = json.loads(json.dumps(model.to_spec()))
    rebuilt = from_spec(spec)
    assert rebuilt.to_spec() == model.to_spec()
    assert [type(m).__name__ for m in rebuilt] == [type(m).__name__ for m in model]
    assert model[0].get_config() == {"in_channels": 3, "out_channels": 4, "kernel_size": [3, 2],
                                     "stride": [2, 1], "padding": [1, 0], "bias": False,
                                     "seed": 3}
    assert model[1].get_config() == {"kernel_size": 2, "stride": None, "padding": 0}
    np.testing.assert_array_equal(rebuilt[0].weight.data, model[0].weight.data)  # same seed
    rebuilt.load_state_dict(model.state_dict())
    x = _rng(10).random((2, 3, 12, 10), dtype=np.float32)
    np.testing.assert_array_equal(rebuilt.forward(x), model.forward(x))


def test_init_like_torch():
    conv = Conv2d(20, 50, 5, seed=0)
    bound = 1 / math.sqrt(20 * 25)
    assert conv.weight.shape == (50, 20, 5, 5) and conv.bias.shape == (50,)
    assert conv.weight.data.dtype == np.float32
    assert np.abs(conv.weight.data).max() <= bound and np.abs(conv.bias.data).max() <= bound
    assert np.abs(conv.weight.data).max() > 0.9 * bound  # uniform over the whole range
    np.testing.assert_array_equal(conv.weight.data, Conv2d(20, 50, 5, seed=0).weight.data)
    assert Conv2d(20, 50, 5, bias=False).bias is None


def test_input_grad_off_skips_grad_in_but_not_weight_grads():
    x = _rng(11).standard_normal((2, 1, 8, 8)).astype(np.float32)
    conv = Conv2d(1, 3, 3, seed=1)
    y = conv.forward(x)
    g = np.ones_like(y)
    full = conv.backward(g)
    assert full is not None and full.shape == x.shape
    w_grad = conv.weight.grad.copy()
    conv.input_grad = False
    conv.forward(x)
    assert conv.backward(g) is None
    np.testing.assert_allclose(conv.weight.grad, w_grad, rtol=1e-6)
    pool = MaxPool2d(2)
    pool.input_grad = False
    pool.forward(x)
    assert pool.backward(np.ones((2, 1, 4, 4), np.float32)) is None


def test_skip_input_grad_reaches_conv():
    nn = pytest.importorskip("distnet.nn")
    if not hasattr(nn, "skip_input_grad"):
        pytest.skip("distnet.nn.skip_input_grad not available")
    model = Sequential(Conv2d(1, 2, 3), MaxPool2d(2), Conv2d(2, 2, 3))
    assert nn.skip_input_grad(model) == ["0"]
    assert model[0].input_grad is False and model[2].input_grad is True


def test_workspaces_are_reused():
    conv, pool = Conv2d(2, 4, 3, seed=0), MaxPool2d(2)
    x = _rng(12).standard_normal((4, 2, 10, 10)).astype(np.float32)
    for _ in range(2):
        y = pool.forward(conv.forward(x))
        conv.backward(pool.backward(np.ones_like(y)))
        ids = {k: id(v) for m in (conv, pool) for k, v in m._workspace.items()}
    y = pool.forward(conv.forward(x))
    conv.backward(pool.backward(np.ones_like(y)))
    assert ids == {k: id(v) for m in (conv, pool) for k, v in m._workspace.items()}


@pytest.mark.parametrize("layer,x_shape,match", [
    (Conv2d(3, 4, 3), (2, 2, 5, 5), r"Conv2d\(3, 4, kernel_size=3\): expected input "
                                     r"\(N, 3, H, W\), got \(2, 2, 5, 5\)"),
    (Conv2d(3, 4, 3), (3, 5, 5), r"expected input \(N, 3, H, W\), got \(3, 5, 5\)"),
    (Conv2d(3, 4, 5), (2, 3, 4, 9), r"Conv2d\(3, 4, kernel_size=5\).*output size would be 0x5"),
    (Conv2d(1, 1, (2, 7), padding=(0, 1)), (1, 1, 4, 4), r"output size would be 3x0"),
    (MaxPool2d(2), (2, 5, 5), r"MaxPool2d\(kernel_size=2\): expected input \(N, C, H, W\)"),
    (AvgPool2d(4), (1, 1, 3, 8), r"AvgPool2d\(kernel_size=4\).*output size would be 0x2"),
])
def test_errors_name_layer_and_shapes(layer, x_shape, match):
    with pytest.raises(ValueError, match=match):
        layer.forward(np.zeros(x_shape, np.float32))


def test_constructor_errors():
    with pytest.raises(ValueError, match="padding"):
        MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="stride must be at least 1"):
        Conv2d(1, 1, 3, stride=0)
    with pytest.raises(TypeError, match="kernel_size"):
        Conv2d(1, 1, (3, 3, 3))
    with pytest.raises(ValueError, match="channel"):
        Conv2d(0, 1, 3)
    conv = Conv2d(1, 2, 3)
    conv.forward(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"backward expected grad_out \(1, 2, 3, 3\)"):
        conv.backward(np.zeros((1, 2, 4, 4), np.float32))


@pytest.mark.gpu
def test_gpu_matches_cpu():
    cp = backend.array_module("cuda")
    rng = _rng(13)
    x = rng.standard_normal((8, 3, 13, 12)).astype(np.float32)
    for make in (lambda: Conv2d(3, 5, 3, stride=2, padding=1, seed=1),
                 lambda: Conv2d(3, 4, 5, seed=2), lambda: MaxPool2d(2), lambda: MaxPool2d(3, 2, 1),
                 lambda: AvgPool2d(3, 1, 1, count_include_pad=False)):
        cpu, gpu = make(), make().to("cuda")
        y = cpu.forward(x)
        y_gpu = gpu.forward(cp.asarray(x))
        np.testing.assert_allclose(backend.to_host(y_gpu), y, rtol=1e-4, atol=1e-4)
        g = rng.standard_normal(y.shape).astype(np.float32)
        gx, gx_gpu = cpu.backward(g), gpu.backward(cp.asarray(g))
        np.testing.assert_allclose(backend.to_host(gx_gpu), gx, rtol=1e-4, atol=1e-4)
        for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
            np.testing.assert_allclose(backend.to_host(q.grad), p.grad, rtol=1e-4, atol=1e-3)
