"""Building a run from its resolved settings: model, optimizer, schedule, augmentation.

Shared by single-process training, the parameter-server workers and servers, and
the compression pipeline, so every mode builds exactly the same model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from distnet.nn.module import Module


def build_model_for(config: dict[str, Any], info: dict[str, Any]) -> Module:
    from distnet.models import build_model

    return build_model(config["model"], tuple(info["input_shape"]), int(info["num_classes"]),
                       seed=config.get("seed", 0))


def optimizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``build_optimizer`` taken from the run settings."""
    kwargs: dict[str, Any] = {"lr": float(config["lr"]),
                              "weight_decay": float(config.get("weight_decay") or 0.0)}
    if config.get("clip_norm"):
        kwargs["clip_norm"] = float(config["clip_norm"])
    if config["optimizer"] in ("momentum", "nesterov") and config.get("momentum") is not None:
        kwargs["momentum"] = float(config["momentum"])
    return kwargs


def total_steps(config: dict[str, Any], n_train: int) -> int:
    return max(1, int(config["epochs"]) * math.ceil(n_train / int(config["batch_size"])))


def build_schedule_for(config: dict[str, Any], n_train: int) -> Callable[[int], float]:
    from distnet.optim import build_schedule

    steps = total_steps(config, n_train)
    # A recipe's warm-up is sized for a full run; a short run must still reach its base lr.
    warmup = min(int(config.get("warmup_steps") or 0), steps // 10)
    return build_schedule(config.get("schedule") or "constant", float(config["lr"]), steps,
                          warmup_steps=warmup)


def build_training(config: dict[str, Any], info: dict[str, Any], n_train: int
                   ) -> tuple[Module, Any, Callable[[int], float]]:
    """Model, optimizer and learning-rate schedule for the run described by ``config``."""
    from distnet.nn import skip_input_grad
    from distnet.optim import build_optimizer

    model = build_model_for(config, info)
    skip_input_grad(model)  # nothing needs d loss / d data: saves the first layer's GEMM
    optimizer = build_optimizer(config["optimizer"], model, **optimizer_config(config))
    return model, optimizer, build_schedule_for(config, n_train)


def normalize_inputs(model: Module, train: Any) -> None:
    """Set the model's first ``Normalize`` layer to the training data's mean and std."""
    from distnet import nn

    for _, layer in model.named_modules():
        if isinstance(layer, nn.Normalize):
            mean, std = train.stats()
            layer.set_buffer("mean", np.asarray(mean, dtype=np.float32))
            layer.set_buffer("std", np.asarray(std or 1.0, dtype=np.float32))
            return


def augmentation_for(config: dict[str, Any], info: dict[str, Any]):
    """The augmentation of the run, or None where it does not apply (non-image inputs)."""
    from distnet.data.augment import get_augmentation

    augment = get_augmentation(config.get("augment"))
    shape = tuple(info["input_shape"])
    if augment is None or len(shape) != 3 or min(shape[1:]) < 16:  # 2 px of 8 is too much
        return None
    return augment
