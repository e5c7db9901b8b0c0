"""Stochastic gradient descent with optional (Nesterov) momentum, PyTorch semantics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distnet import backend
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
    weight decay into the momentum update: the next buffer
    ``mu * v + wd * p + scale * (g1 + g2 + ...)`` is built aside, one pass per gradient,
    then ``p -= lr * next`` and the buffers swap roles. ``prepare_sum`` builds what it
    can of it before the last gradient arrives.
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
        # (step_count, scale, parts) of the next momentum buffer prepare_sum has begun
        self._prepared: tuple[int, float, list[Any]] | None = None

    @property
    def slots(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def hyper(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "nesterov": self.nesterov}

    def _fused(self) -> bool:
        """Whether ``step_sum`` folds the sum in (else it sums first, as the base does)."""
        return not (self.nesterov or self.clip_norm is not None
                    or any(p.mask is not None for _, p in self.params))

    def prepare_sum(self, parts: list[Mapping[str, Any]], scale: float = 1.0) -> None:
        """With momentum, the next momentum buffer ``mu * v + wd * p + scale * sum(parts)``
        is built aside (``v`` and ``p`` stay as they are), so ``step_sum`` has only the
        parts that came later and the parameter pass left. The part that needs no
        gradient goes through NumPy, which lets other threads run meanwhile (a
        co-located worker computing), where SciPy's BLAS would hold the GIL."""
        if self.momentum and self._fused():
            self._advance(parts, scale, [_part_arrays(parts, n, p) for n, p in self.params])

    def _advance(self, parts: list[Mapping[str, Any]], scale: float,
                 arrays: list[list[Any]]) -> None:
        """Bring the "next" buffers to ``mu * v + wd * p + scale * sum(parts)``, from
        what an earlier ``prepare_sum`` of this step left when ``parts`` extends its
        parts (the same objects, the same scale); otherwise from the start. The same
        operations in the same order either way, so the result is bit for bit the same."""
        mark = self._prepared
        begun = [] if mark is None else mark[2]
        fresh = not (mark is not None and mark[0] == self.step_count
                     and len(begun) <= len(parts) and (not begun or mark[1] == scale)
                     and all(a is b for a, b in zip(begun, parts[:len(begun)], strict=True)))
        done = 0 if fresh else len(begun)
        wd = self.weight_decay
        for (name, p), grads in zip(self.params, arrays, strict=True):
            xp = backend.get_array_module(p.data)
            w, s = self.work(name, "next", p.data), self.work(name, "s", p.data)
            if fresh:
                v = self._ensure_state(name, p)["momentum_buffer"]
                xp.multiply(v, self.momentum, out=w)
                if wd:
                    w += xp.multiply(p.data, wd, out=s)
            for g in grads[done:]:
                axpy(scale, g, w, s)
        self._prepared = (self.step_count, scale, list(parts))

    def step_sum(self, parts: list[Mapping[str, Any]], scale: float = 1.0) -> None:
        if not parts or not self._fused():
            super().step_sum(parts, scale)  # these need the summed gradient itself
            return
        arrays = [_part_arrays(parts, name, p) for name, p in self.params]  # all checked first
        wd = self.weight_decay
        if self.momentum:
            self._advance(parts, scale, arrays)
        for (name, p), grads in zip(self.params, arrays, strict=True):
            data, s = p.data, self.work(name, "s", p.data)
            if not self.momentum:  # p = (1 - lr * wd) * p - lr * scale * sum(g)
                if wd:
                    scal(1.0 - self.lr * wd, data)
                for g in grads:
                    axpy(-self.lr * scale, g, data, s)
                continue
            w = self._work[name]["next"]
            axpy(-self.lr, w, data, s)
            st = self.state[name]  # the new buffer is the momentum now, the old one scratch
            st["momentum_buffer"], self._work[name]["next"] = w, st["momentum_buffer"]
        self._prepared = None
        self.step_count += 1

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._prepared = None  # built from the old momentum

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
