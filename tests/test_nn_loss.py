"""CrossEntropyLoss, MSELoss and MultiMarginLoss: gradients, PyTorch parity, errors."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_loss

from distnet import nn


def batch(n=6, c=5, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((n, c)), rng.integers(0, c, n).astype(np.int64)


LOSSES = [
    ("cross_entropy", nn.CrossEntropyLoss, "class"),
    ("mse-float", nn.MSELoss, "float"),
    ("mse-class", nn.MSELoss, "class"),
    ("multi_margin", nn.MultiMarginLoss, "class"),
    ("multi_margin-p2", lambda: nn.MultiMarginLoss(p=2, margin=0.7), "class"),
]


def _target(kind, pred, classes, seed=1):
    if kind == "float":
        return np.random.default_rng(seed).standard_normal(pred.shape)
    return classes


@pytest.mark.parametrize("name,make,kind", LOSSES, ids=[t[0] for t in LOSSES])
def test_gradcheck(name, make, kind):
    pred, classes = batch()
    check_loss(make(), pred, _target(kind, pred, classes))


TORCH = [
    ("cross_entropy", nn.CrossEntropyLoss, "class",
     lambda F, p, t: F.cross_entropy(p, t)),
    ("mse-float", nn.MSELoss, "float", lambda F, p, t: F.mse_loss(p, t)),
    ("mse-class", nn.MSELoss, "class",
     lambda F, p, t: F.mse_loss(p, F.one_hot(t, p.shape[1]).to(p.dtype))),
    ("multi_margin", nn.MultiMarginLoss, "class",
     lambda F, p, t: F.multi_margin_loss(p, t)),
    ("multi_margin-p2-m05", lambda: nn.MultiMarginLoss(p=2, margin=0.5), "class",
     lambda F, p, t: F.multi_margin_loss(p, t, p=2, margin=0.5)),
]


@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("name,make,kind,reference", TORCH, ids=[t[0] for t in TORCH])
def test_against_torch(name, make, kind, reference, scale):
    torch = pytest.importorskip("torch")
    pred, classes = batch(n=16, c=7, seed=2, scale=scale)
    pred = pred.astype(np.float32)
    target = _target(kind, pred, classes)
    if kind == "float":
        target = target.astype(np.float32)
    loss_fn = make()
    loss = loss_fn(pred, target)
    grad = loss_fn.backward()
    tp = torch.tensor(pred, requires_grad=True)
    tl = reference(torch.nn.functional, tp, torch.from_numpy(target))
    tl.backward()
    assert isinstance(loss, float)
    assert loss == pytest.approx(tl.item(), rel=1e-5, abs=1e-6)
    assert grad.dtype == np.float32 and grad.shape == pred.shape
    np.testing.assert_allclose(grad, tp.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_cross_entropy_is_stable_for_huge_logits():
    pred = np.array([[1e4, -1e4, 0.0], [-3e4, 3e4, 3e4]], np.float32)
    target = np.array([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(pred, target)
    grad = loss_fn.backward()
    assert loss == pytest.approx(np.log(2) / 2, rel=1e-5)
    np.testing.assert_allclose(grad, [[0, 0, 0], [0, 0.25, -0.25]], atol=1e-7)


def test_backward_returns_workspace_and_scales():
    pred, target = batch()
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(pred, target)
    g1 = loss_fn.backward()
    np.testing.assert_allclose(loss_fn.backward(2.0), 2 * g1)
    np.testing.assert_array_equal(loss_fn.backward(), g1)  # scaling left the gradient as it was
    loss_fn(pred, target)
    assert loss_fn.backward() is g1  # reused across calls: no allocation per step


@pytest.mark.parametrize("make", [nn.CrossEntropyLoss, nn.MSELoss, nn.MultiMarginLoss])
def test_errors(make):
    pred, target = batch(n=4, c=3)
    with pytest.raises(RuntimeError, match="before the loss"):
        make().backward()
    with pytest.raises(ValueError, match=r"target class indices must be in \[0, 3\)"):
        make()(pred, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"\[0, 3\), got \[-1, 1\]"):
        make()(pred, np.array([0, 1, -1, 0]))
    with pytest.raises(ValueError, match=r"expected pred \(N, C\) and target \(N,\)"):
        make()(pred, np.array([0, 1, 2]))


def test_float_target_errors():
    pred, _ = batch(n=4, c=3)
    with pytest.raises(TypeError, match="int64 class indices"):
        nn.CrossEntropyLoss()(pred, np.zeros(4))
    with pytest.raises(ValueError, match=r"MSELoss: expected target of pred's shape \(4, 3\)"):
        nn.MSELoss()(pred, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        nn.MultiMarginLoss(p=3)
