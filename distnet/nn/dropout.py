"""Inverted dropout with its own random generator."""

from __future__ import annotations

from typing import Any

from distnet import backend
from distnet.nn.module import Module


class Dropout(Module):
    """Zero each element with probability ``p`` in training; scale the rest by ``1/(1-p)``.

    x: (N, ...) float -> same shape. In eval mode (or with ``p == 0``) forward is the
    identity and returns x itself. The layer draws from its own generator
    (``xp.random.default_rng(seed)`` on x's device), so a seeded model drops the same
    units on every run whatever else uses NumPy's global state; ``reseed(seed)``
    restarts it, which is how a gradient check keeps the mask fixed. Uniforms are
    drawn in float32 whatever x's dtype, so the mask does not depend on the dtype.
    """

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.seed = seed
        self.reseed(seed)

    def get_config(self) -> dict[str, Any]:
        return {"p": self.p, "seed": self.seed}

    def reseed(self, seed: int | None = None) -> None:
        """Restart the generator from ``seed`` (the next forward draws the same mask again)."""
        self._rng_seed = seed
        self._rng: Any = None

    def _generator(self, xp: Any) -> Any:
        if self._rng is None or self._rng_xp is not xp:
            self._rng = xp.random.default_rng(self._rng_seed)
            self._rng_xp = xp
        return self._rng

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0.0:
            self._scale = None
            return x
        xp = backend.get_array_module(x)
        uniform = self.workspace("uniform", x.shape, xp.float32, xp)
        # size is given although out has it: CuPy's random(out=) without size draws one
        # value and broadcasts it.
        self._generator(xp).random(size=x.shape, dtype=xp.float32, out=uniform)
        # One float mask holding 0 or 1/(1-p) serves forward and backward alike.
        scale = self.workspace("scale", x.shape, x.dtype, xp)
        xp.greater_equal(uniform, self.p, out=scale)
        if self.p < 1.0:
            scale *= 1.0 / (1.0 - self.p)
        self._scale = scale
        return xp.multiply(x, scale, out=self.workspace("out", x.shape, x.dtype, xp))

    def backward(self, grad_out: Any) -> Any:
        if not hasattr(self, "_scale"):
            raise RuntimeError("Dropout.backward called before forward")
        if self._scale is None:
            return grad_out
        xp = backend.get_array_module(grad_out)
        grad_in = self.workspace("grad_in", grad_out.shape, grad_out.dtype, xp)
        return xp.multiply(grad_out, self._scale, out=grad_in)
