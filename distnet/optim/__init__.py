"""Optimizers, learning-rate schedules and gradient clipping.

``build_optimizer(name, params, **config)`` builds one by name; every optimizer
updates its parameters in place from their ``.grad`` (see ``optimizer.py``).
"""

from __future__ import annotations

from typing import Any

from distnet.optim.adaptive import Adagrad, Adam, RMSProp
from distnet.optim.clip import clip_grad_norm, global_norm
from distnet.optim.optimizer import Optimizer, named_parameter_list
from distnet.optim.schedule import SCHEDULES, Schedule, build_schedule
from distnet.optim.sgd import SGD

# name -> (class, defaults that the name implies)
OPTIMIZERS: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "momentum": (SGD, {"momentum": 0.9}),
    "nesterov": (SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (Adagrad, {}),
    "rmsprop": (RMSProp, {}),
    "adam": (Adam, {}),
}


def build_optimizer(name: str, params: Any, **config: Any) -> Optimizer:
    """The optimizer ``name`` over ``params`` (a Module or (name, Parameter) pairs).

    ``momentum`` is SGD with momentum 0.9 and ``nesterov`` adds Nesterov's correction;
    ``config`` (lr, weight_decay, clip_norm, momentum, betas, ...) overrides defaults.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    cls, defaults = OPTIMIZERS[key]
    try:
        return cls(params, **{**defaults, **config})
    except TypeError as exc:
        if "unexpected keyword" not in str(exc):
            raise
        raise TypeError(f"optimizer {key!r}: {exc}") from None


__all__ = [
    "OPTIMIZERS", "SCHEDULES", "SGD", "Adagrad", "Adam", "Optimizer", "RMSProp", "Schedule",
    "build_optimizer", "build_schedule", "clip_grad_norm", "global_norm",
    "named_parameter_list",
]
