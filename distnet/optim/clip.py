"""Global gradient-norm clipping (PyTorch's ``clip_grad_norm_``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from distnet import backend

# PyTorch adds this to the norm before dividing, so a zero gradient never divides by zero.
CLIP_EPS = 1e-6


def global_norm(arrays: Sequence[Any]) -> float:
    """The L2 norm of all ``arrays`` taken together, as a Python float.

    Sums per-array squared norms on the arrays' device and converts once at the end
    (one device sync on CuPy). ``dot`` of a contiguous array's ``ravel`` allocates nothing.
    """
    total: Any = 0.0
    for a in arrays:
        xp = backend.get_array_module(a)
        flat = a.ravel()
        total = total + xp.dot(flat, flat)
    return math.sqrt(float(total))


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor PyTorch scales the gradients by: ``min(1, max_norm / (norm + 1e-6))``."""
    return min(1.0, max_norm / (total_norm + CLIP_EPS))


def clip_grad_norm(params: Any, max_norm: float) -> float:
    """Scale every ``.grad`` in place so their global L2 norm is at most ``max_norm``.

    params: a Module, an iterable of Parameters or of ``(name, Parameter)`` pairs.
    Returns the total norm *before* clipping (a Python float), like PyTorch's
    ``clip_grad_norm_``. The gradients are used as they are (masks are not applied
    here; an optimizer's ``clip_norm`` does honour masks).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    grads = [p.grad for p in _parameters(params)]
    total = global_norm(grads)
    coef = clip_coefficient(total, float(max_norm))
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


def _parameters(params: Any) -> list[Any]:
    if hasattr(params, "named_parameters"):
        return [p for _, p in params.named_parameters()]
    items: Iterable[Any] = params
    return [item[1] if isinstance(item, tuple) else item for item in items]
