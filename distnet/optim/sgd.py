"""Stochastic gradient descent with optional (Nesterov) momentum, PyTorch semantics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distnet.nn.module import Parameter
from distnet.optim.blas import axpy, scal
from distnet.optim.optimizer import Optimizer, _check, _part_arrays


class SGD(Optimizer):
    """``v = mu * v + g; p -= lr * v`` (or ``p -= lr * (g + mu * v)`` with Nesterov).

    This is ``torch.optim.SGD`` with dampening 0: the momentum buffer starts at zero,
    so its first value is ``g``, as in PyTorch. ``g`` already includes weight decay
    and clipping (see ``Optimizer``). Slot: ``momentum_buffer`` (when momentum > 0).

    Each step is three in-place BLAS passes over the parameter (one without momentum,
    four with Nesterov): no array is allocated after the first step. ``step_sum`` (a
    server's step from several workers' gradients) folds the sum, the mean and the
    weight decay into the momentum pass: ``v = mu * v + scale * (g1 + g2 + ...) + wd * p``
    is one pass per gradient plus two, where summing, scaling and adding the decay
    first would be four more.
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

    def step_sum(self, parts: list[Mapping[str, Any]], scale: float = 1.0) -> None:
        if (not parts or self.nesterov or self.clip_norm is not None
                or any(p.mask is not None for _, p in self.params)):
            super().step_sum(parts, scale)  # these need the summed gradient itself
            return
        arrays = [_part_arrays(parts, name, p) for name, p in self.params]  # all checked first
        self.step_count += 1
        wd = self.weight_decay
        for (name, p), grads in zip(self.params, arrays, strict=True):
            data, s = p.data, self.work(name, "s", p.data)
            if not self.momentum:  # p = (1 - lr * wd) * p - lr * scale * sum(g)
                if wd:
                    scal(1.0 - self.lr * wd, data)
                for g in grads:
                    axpy(-self.lr * scale, g, data, s)
                continue
            v = self._ensure_state(name, p)["momentum_buffer"]
            scal(self.momentum, v)
            for g in grads:
                axpy(scale, g, v, s)
            if wd:
                axpy(wd, data, v, s)
            axpy(-self.lr, v, data, s)

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
