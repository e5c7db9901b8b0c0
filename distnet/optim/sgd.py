"""Stochastic gradient descent with optional (Nesterov) momentum, PyTorch semantics."""

from __future__ import annotations

from typing import Any

from distnet.nn.module import Parameter
from distnet.optim.blas import axpy, scal
from distnet.optim.optimizer import Optimizer, _check


class SGD(Optimizer):
    """``v = mu * v + g; p -= lr * v`` (or ``p -= lr * (g + mu * v)`` with Nesterov).

    This is ``torch.optim.SGD`` with dampening 0: the momentum buffer starts at zero,
    so its first value is ``g``, as in PyTorch. ``g`` already includes weight decay
    and clipping (see ``Optimizer``). Slot: ``momentum_buffer`` (when momentum > 0).

    Each step is three in-place BLAS passes over the parameter (one without momentum,
    four with Nesterov): no array is allocated after the first step.
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
        # in-place BLAS passes (blas.py): p and v are read and written once per pass, with
        # no temporary; the scratch is only touched where BLAS does not apply (CuPy)
        data, s = p.data, self.work(name, "s", p.data)
        if not self.momentum:
            axpy(-self.lr, g, data, s)
            return
        v = self.state[name]["momentum_buffer"]
        scal(self.momentum, v)
        axpy(1.0, g, v, s)
        if self.nesterov:  # p -= lr * (g + mu * v)
            axpy(-self.lr, g, data, s)
            axpy(-self.lr * self.momentum, v, data, s)
        else:
            axpy(-self.lr, v, data, s)
