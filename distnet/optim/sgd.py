"""Stochastic gradient descent with optional (Nesterov) momentum, PyTorch semantics."""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet.nn.module import Parameter
from distnet.optim.optimizer import Optimizer, _check

# Above this many elements the update runs in chunks that stay in the CPU cache: its
# four passes then cost one trip through memory instead of four (a parameter server
# updating 4M floats per step spends most of the step there).
CHUNK = 1 << 16


class SGD(Optimizer):
    """``v = mu * v + g; p -= lr * v`` (or ``p -= lr * (g + mu * v)`` with Nesterov).

    This is ``torch.optim.SGD`` with dampening 0: the momentum buffer starts at zero,
    so its first value is ``g``, as in PyTorch. ``g`` already includes weight decay
    and clipping (see ``Optimizer``). Slot: ``momentum_buffer`` (when momentum > 0).

    Each step is four in-place passes over the parameter (two without momentum):
    no array is allocated after the first step.
    """

    name = "sgd"

    def __init__(self, params: Any, lr: float = 0.01, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 clip_norm: float | None = None) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, clip_norm=clip_norm)
        _check(0.0 <= momentum < 1.0, f"momentum must be in [0, 1), got {momentum}")
        _check(not nesterov or momentum > 0, "nesterov momentum needs momentum > 0")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    @property
    def slots(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def hyper(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "nesterov": self.nesterov}

    def _update(self, name: str, p: Parameter, g: Any, xp: Any) -> None:
        s = self.work(name, "s", p.data)
        v = self.state[name]["momentum_buffer"] if self.momentum else None
        arrays = [a for a in (p.data, g, s, v) if a is not None]
        if xp is np and p.data.size > 2 * CHUNK and all(a.flags.c_contiguous for a in arrays):
            flat = [a.reshape(-1) for a in arrays]
            for i in range(0, p.data.size, CHUNK):
                self._apply(*(a[i : i + CHUNK] for a in flat), xp=xp)
        else:
            self._apply(*arrays, xp=xp)

    def _apply(self, data: Any, g: Any, s: Any, v: Any = None, *, xp: Any) -> None:
        """One update of ``data`` (in place) from ``g``, with scratch ``s`` and buffer ``v``."""
        if v is None:
            data += xp.multiply(g, -self.lr, out=s)
            return
        v *= self.momentum
        v += g
        if self.nesterov:  # p -= lr * (g + mu * v), as two in-place additions
            data += xp.multiply(g, -self.lr, out=s)
            data += xp.multiply(v, -self.lr * self.momentum, out=s)
        else:
            data += xp.multiply(v, -self.lr, out=s)
