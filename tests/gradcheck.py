"""The one numerical gradient check every layer and loss test uses (float64).

A module's backward is compared with central differences of the scalar
``sum(forward(x) * g)`` for a fixed random ``g``, with respect to the input and to
every parameter. Large tensors are checked at a random sample of entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from distnet.nn.module import Module


def to_float64(module: Module) -> Module:
    """Cast a module's parameters, gradients and buffers to float64 in place."""
    for p in module.parameters():
        p.data = p.data.astype(np.float64)
        p.grad = p.grad.astype(np.float64)
        if p.mask is not None:
            p.mask = p.mask.astype(np.float64)
    for _, mod in module.named_modules():
        for name, b in list(mod._buffers.items()):
            if np.issubdtype(b.dtype, np.floating):
                mod.register_buffer(name, b.astype(np.float64))
        mod._workspace.clear()
    return module


def _sample(size: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(size) if size <= limit else rng.choice(size, limit, replace=False)


def numerical_grad(f: Callable[[], float], array: np.ndarray, index: np.ndarray,
                   eps: float) -> np.ndarray:
    """Central differences of ``f`` w.r.t. ``array.flat[index]`` (perturbed in place)."""
    flat = array.reshape(-1)
    assert np.shares_memory(flat, array), "array must be contiguous to be perturbed in place"
    out = np.empty(len(index))
    for k, i in enumerate(index):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        out[k] = (fp - fm) / (2 * eps)
    return out


def check_module(module: Module, x: np.ndarray, *, seed: int = 0, eps: float = 1e-6,
                 rtol: float = 1e-5, atol: float = 1e-7, max_checks: int = 60,
                 check_input: bool = True, before_forward: Callable[[], Any] | None = None
                 ) -> None:
    """Assert that ``module.backward`` matches numerical gradients in float64.

    ``before_forward`` runs before every forward (e.g. to reseed a dropout mask).
    """
    rng = np.random.default_rng(seed)
    to_float64(module)
    x = np.array(x, dtype=np.float64)

    def run() -> np.ndarray:
        if before_forward is not None:
            before_forward()
        return module.forward(x)

    g = rng.standard_normal(np.shape(run()))

    def loss() -> float:
        return float(np.sum(run() * g))

    run()
    grad_x = np.array(module.backward(g), copy=True)
    analytic = {name: p.grad.copy() for name, p in module.named_parameters()}

    targets: list[tuple[str, np.ndarray, np.ndarray]] = []
    if check_input:
        targets.append(("input", x, grad_x))
    for name, p in module.named_parameters():
        targets.append((name, p.data, analytic[name]))
    for name, array, grad in targets:
        assert grad.shape == array.shape, f"{name}: grad shape {grad.shape} != {array.shape}"
        idx = _sample(array.size, max_checks, rng)
        num = numerical_grad(loss, array, idx, eps)
        np.testing.assert_allclose(grad.reshape(-1)[idx], num, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {type(module).__name__} w.r.t. {name}")


def check_loss(loss_fn: Any, pred: np.ndarray, target: np.ndarray, *, seed: int = 0,
               eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-8) -> None:
    """Assert that ``loss_fn.backward()`` matches numerical gradients of the loss."""
    rng = np.random.default_rng(seed)
    pred = np.array(pred, dtype=np.float64)
    float(loss_fn(pred, target))
    grad = np.array(loss_fn.backward(), copy=True)
    assert grad.shape == pred.shape
    idx = _sample(pred.size, 200, rng)
    num = numerical_grad(lambda: float(loss_fn(pred, target)), pred, idx, eps)
    np.testing.assert_allclose(grad.reshape(-1)[idx], num, rtol=rtol, atol=atol,
                               err_msg=f"gradient of {type(loss_fn).__name__}")
