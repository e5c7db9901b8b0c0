"""Learning-rate schedules: stateless callables ``schedule(step) -> lr``.

A schedule is a pure function of the global step (0-based), so a parameter
server, a resumed run and every worker compute the same rate without sharing
state. Each has an optional linear warm-up: for ``step < warmup_steps`` the rate
is ``base_lr * (step + 1) / warmup_steps``; the schedule proper then runs on
``step - warmup_steps``, so a cosine decays over the steps left after warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """Base: constant ``base_lr`` after the warm-up."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not self.base_lr >= 0:
            raise ValueError(f"base_lr must be >= 0, got {self.base_lr}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        return self.after_warmup(step - self.warmup_steps)

    def after_warmup(self, t: int) -> float:
        return self.base_lr


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """``base_lr`` throughout (after the warm-up)."""


@dataclass(frozen=True)
class StepSchedule(Schedule):
    """``base_lr * gamma ** (t // step_size)``; step_size defaults to a third of the run."""

    step_size: int | None = None
    gamma: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step_size is not None and self.step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")

    def after_warmup(self, t: int) -> float:
        size = self.step_size or max(1, (self.total_steps - self.warmup_steps) // 3)
        return self.base_lr * self.gamma ** (t // size)


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """``min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2``, T = total - warmup,
    then ``min_lr`` once t >= T."""

    min_lr: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.min_lr <= self.base_lr:
            raise ValueError(f"min_lr must be in [0, base_lr={self.base_lr}], got {self.min_lr}")

    def after_warmup(self, t: int) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        frac = min(t, span) / span
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


SCHEDULES: dict[str, type[Schedule]] = {
    "constant": ConstantSchedule,
    "step": StepSchedule,
    "cosine": CosineSchedule,
}


def build_schedule(name: str, base_lr: float, total_steps: int, **kwargs: Any) -> Schedule:
    """The schedule ``name`` (constant | step | cosine) as a callable ``step -> lr``.

    kwargs: ``warmup_steps`` (all), ``step_size`` and ``gamma`` (step), ``min_lr`` (cosine).
    """
    key = (name or "constant").lower()
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: expected one of {', '.join(SCHEDULES)}")
    cls = SCHEDULES[key]
    allowed = set(cls.__dataclass_fields__) - {"base_lr", "total_steps"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"schedule {key!r} takes {sorted(allowed)}, got unknown {unknown}")
    return cls(float(base_lr), int(total_steps), **kwargs)
