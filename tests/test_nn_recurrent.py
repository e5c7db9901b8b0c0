"""LSTM: backpropagation through time, PyTorch parity, layout and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gradcheck import check_module

from distnet import nn


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("num_layers,batch_first,steps", [(1, True, 3), (2, True, 4),
                                                          (2, False, 3)])
def test_gradcheck_through_time(num_layers, batch_first, steps):
    lstm = nn.LSTM(3, 4, num_layers=num_layers, batch_first=batch_first, seed=0)
    shape = (2, steps, 3) if batch_first else (steps, 2, 3)
    check_module(lstm, randn(*shape), max_checks=40)


def test_gradient_reaches_the_first_step():
    """The last output depends on the first input only through the recurrence."""
    lstm = nn.LSTM(2, 3, seed=1)
    x = randn(1, 5, 2).astype(np.float32)
    y = lstm.forward(x)
    g = np.zeros_like(y)
    g[:, -1] = 1
    grad = lstm.backward(g)
    assert np.abs(grad[:, 0]).sum() > 0


@pytest.mark.parametrize("num_layers,batch_first", [(1, True), (2, True), (2, False)])
def test_against_torch(num_layers, batch_first):
    torch = pytest.importorskip("torch")
    ours = nn.LSTM(5, 6, num_layers=num_layers, batch_first=batch_first, seed=3)
    theirs = torch.nn.LSTM(5, 6, num_layers=num_layers, batch_first=batch_first)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in theirs.named_parameters()]
    with torch.no_grad():
        for name, p in ours.named_parameters():
            theirs.get_parameter(name).copy_(torch.from_numpy(p.data))
    x = randn(3, 7, 5).astype(np.float32)
    if not batch_first:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    y = ours.forward(x)
    g = randn(*y.shape, seed=1).astype(np.float32)
    grad_x = ours.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty, _ = theirs(tx)
    ty.backward(torch.from_numpy(g))
    tol = {"rtol": 1e-4, "atol": 1e-5}
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol, err_msg="output")
    np.testing.assert_allclose(grad_x, tx.grad.numpy(), **tol, err_msg="grad x")
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad, theirs.get_parameter(name).grad.numpy(), **tol,
                                   err_msg=f"grad {name}")


def test_shapes_init_and_spec():
    lstm = nn.LSTM(4, 8, num_layers=2, seed=0)
    assert lstm.forward(np.zeros((3, 5, 4), np.float32)).shape == (3, 5, 8)
    bound = 1 / np.sqrt(8)
    for p in lstm.parameters():
        assert p.data.dtype == np.float32 and np.abs(p.data).max() <= bound
    spec = json.loads(json.dumps(lstm.to_spec()))
    copy = nn.from_spec(spec)
    assert copy.get_config() == lstm.get_config()
    for (name, p), q in zip(lstm.named_parameters(), copy.parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)  # same seed, same init


def test_errors():
    with pytest.raises(ValueError, match=r"LSTM\(4, 8\): expected input \(N, T, 4\), "
                                         r"got \(3, 5, 2\)"):
        nn.LSTM(4, 8).forward(np.zeros((3, 5, 2), np.float32))
    with pytest.raises(ValueError, match=r"expected input \(T, N, 4\)"):
        nn.LSTM(4, 8, batch_first=False).forward(np.zeros((3, 4), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.LSTM(4, 8).backward(np.zeros((3, 5, 8), np.float32))
