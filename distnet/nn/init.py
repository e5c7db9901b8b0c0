"""Parameter initialisers with PyTorch's fan and gain conventions.

Each takes a ``shape`` and ``rng`` (an ``np.random.Generator``, an int seed or
``None``) and returns a new float32 NumPy array; layers create their parameters on
the host and ``Module.to(device)`` moves them. Fans follow
``torch.nn.init._calculate_fan_in_and_fan_out``: for a weight ``(out, in, *kernel)``,
``fan_in = in * prod(kernel)`` and ``fan_out = out * prod(kernel)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "as_generator",
    "calculate_gain",
    "fans",
    "kaiming_normal",
    "kaiming_uniform",
    "uniform",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]

def as_generator(rng: Any = None) -> np.random.Generator:
    """``rng`` itself when it is a Generator, else ``np.random.default_rng(rng)``."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _shape(shape: Any) -> tuple[int, ...]:
    return (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)


def fans(shape: Any) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of ``shape`` (at least 2 dimensions)."""
    shape = _shape(shape)
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a shape with at least 2 dimensions, got {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for ``nonlinearity`` (as ``torch.nn.init.calculate_gain``)."""
    linear = ("linear", "conv1d", "conv2d", "conv3d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def uniform(shape: Any, bound: float, rng: Any = None) -> np.ndarray:
    """U(-bound, bound), float32 (biases use ``bound = 1 / sqrt(fan_in)``)."""
    gen = as_generator(rng)
    return gen.uniform(-bound, bound, size=_shape(shape)).astype(np.float32)


def zeros(shape: Any) -> np.ndarray:
    return np.zeros(_shape(shape), dtype=np.float32)


def xavier_uniform(shape: Any, gain: float = 1.0, rng: Any = None) -> np.ndarray:
    """U(-a, a) with ``a = gain * sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio, 2010)."""
    fan_in, fan_out = fans(shape)
    return uniform(shape, gain * math.sqrt(6.0 / (fan_in + fan_out)), rng)


def xavier_normal(shape: Any, gain: float = 1.0, rng: Any = None) -> np.ndarray:
    """N(0, std^2) with ``std = gain * sqrt(2 / (fan_in + fan_out))``."""
    fan_in, fan_out = fans(shape)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return as_generator(rng).normal(0.0, std, size=_shape(shape)).astype(np.float32)


def _kaiming_std(shape: Any, a: float, mode: str, nonlinearity: str) -> float:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = fans(shape)
    fan = fan_in if mode == "fan_in" else fan_out
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def kaiming_uniform(shape: Any, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu", rng: Any = None) -> np.ndarray:
    """U(-b, b) with ``b = gain * sqrt(3 / fan)`` (He et al., 2015).

    ``a=sqrt(5)`` gives PyTorch's default ``Linear``/``Conv2d`` weight init, whose
    bound is ``1 / sqrt(fan_in)``.
    """
    std = _kaiming_std(shape, a, mode, nonlinearity)
    return uniform(shape, math.sqrt(3.0) * std, rng)


def kaiming_normal(shape: Any, a: float = 0.0, mode: str = "fan_in",
                   nonlinearity: str = "leaky_relu", rng: Any = None) -> np.ndarray:
    """N(0, std^2) with ``std = gain / sqrt(fan)``."""
    std = _kaiming_std(shape, a, mode, nonlinearity)
    return as_generator(rng).normal(0.0, std, size=_shape(shape)).astype(np.float32)
