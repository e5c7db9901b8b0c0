"""Optimizers with per-coordinate step sizes: Adagrad, RMSProp and Adam (PyTorch semantics).

Every update is a chain of in-place ``out=`` operations through one scratch array
per parameter (``work(name, "s")``): no array is allocated after the first step.
``g`` is the effective gradient (weight decay and clipping included, see
``Optimizer``) and is only read.
"""

from __future__ import annotations

import math
from typing import Any

from distnet.nn.module import Parameter
from distnet.optim.optimizer import Optimizer, _check


class Adagrad(Optimizer):
    """``sum += g^2; p -= clr * g / (sqrt(sum) + eps)`` with ``clr = lr / (1 + (t-1) lr_decay)``.

    ``torch.optim.Adagrad`` with ``initial_accumulator_value=0``. Slot: ``sum``.
    """

    name = "adagrad"

    def __init__(self, params: Any, lr: float = 0.01, lr_decay: float = 0.0,
                 eps: float = 1e-10, weight_decay: float = 0.0,
                 clip_norm: float | None = None) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, clip_norm=clip_norm)
        _check(lr_decay >= 0, f"lr_decay must be >= 0, got {lr_decay}")
        _check(eps > 0, f"eps must be > 0, got {eps}")
        self.lr_decay = float(lr_decay)
        self.eps = float(eps)

    @property
    def slots(self) -> tuple[str, ...]:
        return ("sum",)

    def hyper(self) -> dict[str, Any]:
        return {"lr_decay": self.lr_decay, "eps": self.eps}

    def _update(self, name: str, p: Parameter, g: Any, xp: Any) -> None:
        acc = self.state[name]["sum"]
        s = self.work(name, "s", p.data)
        clr = self.lr / (1.0 + (self.step_count - 1) * self.lr_decay)
        acc += xp.multiply(g, g, out=s)
        xp.sqrt(acc, out=s)
        s += self.eps
        xp.divide(g, s, out=s)
        s *= -clr
        p.data += s


class RMSProp(Optimizer):
    """``sq = alpha sq + (1-alpha) g^2; p -= lr * g / (sqrt(sq) + eps)``.

    ``torch.optim.RMSprop``: with ``centered`` the running mean of g is subtracted
    (``sqrt(sq - mean^2)``), with ``momentum`` the step goes through a buffer.
    Slots: ``square_avg`` (+ ``momentum_buffer``, ``grad_avg``).
    """

    name = "rmsprop"

    def __init__(self, params: Any, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, centered: bool = False, weight_decay: float = 0.0,
                 clip_norm: float | None = None) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, clip_norm=clip_norm)
        _check(0.0 <= alpha < 1.0, f"alpha must be in [0, 1), got {alpha}")
        _check(eps > 0, f"eps must be > 0, got {eps}")
        _check(0.0 <= momentum < 1.0, f"momentum must be in [0, 1), got {momentum}")
        self.alpha, self.eps = float(alpha), float(eps)
        self.momentum, self.centered = float(momentum), bool(centered)

    @property
    def slots(self) -> tuple[str, ...]:
        return (("square_avg",) + (("momentum_buffer",) if self.momentum else ())
                + (("grad_avg",) if self.centered else ()))

    def hyper(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "eps": self.eps, "momentum": self.momentum,
                "centered": self.centered}

    def _update(self, name: str, p: Parameter, g: Any, xp: Any) -> None:
        st = self.state[name]
        sq = st["square_avg"]
        s = self.work(name, "s", p.data)
        sq *= self.alpha
        xp.multiply(g, g, out=s)
        s *= 1.0 - self.alpha
        sq += s
        if self.centered:
            ga = st["grad_avg"]
            _lerp(ga, g, self.alpha)
            xp.multiply(ga, ga, out=s)
            xp.subtract(sq, s, out=s)
            xp.sqrt(s, out=s)
        else:
            xp.sqrt(sq, out=s)
        s += self.eps
        xp.divide(g, s, out=s)
        if self.momentum:
            buf = st["momentum_buffer"]
            buf *= self.momentum
            buf += s
            p.data += xp.multiply(buf, -self.lr, out=s)
        else:
            s *= -self.lr
            p.data += s


class Adam(Optimizer):
    """``torch.optim.Adam`` (L2 weight decay added to g, not AdamW; no amsgrad).

    ``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, t = ``step_count``.
    Slots: ``exp_avg``, ``exp_avg_sq``.
    """

    name = "adam"

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 clip_norm: float | None = None) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, clip_norm=clip_norm)
        b1, b2 = (float(b) for b in betas)
        _check(0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0, f"betas must be in [0, 1), got {betas}")
        _check(eps > 0, f"eps must be > 0, got {eps}")
        self.betas = (b1, b2)
        self.eps = float(eps)

    @property
    def slots(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def hyper(self) -> dict[str, Any]:
        return {"betas": list(self.betas), "eps": self.eps}

    def _update(self, name: str, p: Parameter, g: Any, xp: Any) -> None:
        st = self.state[name]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        s = self.work(name, "s", p.data)
        b1, b2 = self.betas
        t = self.step_count
        _lerp(m, g, b1)
        v *= b2
        xp.multiply(g, g, out=s)
        s *= 1.0 - b2
        v += s
        step_size = self.lr / (1.0 - b1**t)
        xp.sqrt(v, out=s)
        s /= math.sqrt(1.0 - b2**t)
        s += self.eps
        xp.divide(m, s, out=s)
        s *= -step_size
        p.data += s


def _lerp(avg: Any, g: Any, decay: float) -> None:
    """``avg = decay * avg + (1 - decay) * g`` in place, with no temporary:
    ``(avg - g) * decay + g``."""
    avg -= g
    avg *= decay
    avg += g
