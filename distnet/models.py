"""The model zoo: models by name, and the training recipe each trains well with.

Every model starts with ``Normalize``, so the input scaling used in training is
part of the model (its checkpoint and its ONNX export): users feed what the data
loader yields, images ``(N, C, H, W)`` float32 in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distnet import nn

Shape = tuple[int, int, int]


def _flat(shape: Shape) -> int:
    c, h, w = shape
    return c * h * w


def lenet300(input_shape: Shape, num_classes: int, seed: int | None = None) -> nn.Sequential:
    """LeNet-300-100 (Deep Compression's fully connected net): D-300-100-classes."""
    s = _seeds(seed, 3)
    return nn.Sequential(
        nn.Normalize(), nn.Flatten(),
        nn.Linear(_flat(input_shape), 300, seed=s[0]), nn.ReLU(),
        nn.Linear(300, 100, seed=s[1]), nn.ReLU(),
        nn.Linear(100, num_classes, seed=s[2]),
    )


def lenet5(input_shape: Shape, num_classes: int, seed: int | None = None) -> nn.Sequential:
    """Caffe's LeNet-5: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc classes.

    Inputs smaller than 16x16 (the 8x8 digits) get 2 pixels of padding per conv so
    both 5x5 convolutions still fit.
    """
    c, h, w = input_shape
    pad = 2 if min(h, w) < 16 else 0
    h1, w1 = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
    h2, w2 = (h1 + 2 * pad - 4) // 2, (w1 + 2 * pad - 4) // 2
    if min(h2, w2) < 1:
        raise ValueError(f"lenet5 needs larger inputs than {input_shape}")
    s = _seeds(seed, 4)
    return nn.Sequential(
        nn.Normalize(),
        nn.Conv2d(c, 20, 5, padding=pad, seed=s[0]), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5, padding=pad, seed=s[1]), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * h2 * w2, 500, seed=s[2]), nn.ReLU(),
        nn.Linear(500, num_classes, seed=s[3]),
    )


def cnn_bn(input_shape: Shape, num_classes: int, seed: int | None = None) -> nn.Sequential:
    """A small CNN with batch norm: two conv-BN-ReLU-pool stages and a classifier."""
    c, h, w = input_shape
    s = _seeds(seed, 5)
    return nn.Sequential(
        nn.Normalize(),
        nn.Conv2d(c, 16, 3, padding=1, bias=False, seed=s[0]), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False, seed=s[1]), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 4) * (w // 4), 128, seed=s[2]), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Dropout(0.2, seed=s[3]),
        nn.Linear(128, num_classes, seed=s[4]),
    )


def resnet_small(input_shape: Shape, num_classes: int,
                 seed: int | None = None) -> nn.Sequential:
    """A small residual net: stem conv, two residual stages, global average pool, fc."""
    c, h, w = input_shape
    s = _seeds(seed, 4)
    return nn.Sequential(
        nn.Normalize(),
        nn.Conv2d(c, 16, 3, padding=1, bias=False, seed=s[0]), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ResidualBlock(16, 16, stride=1, seed=s[1]),
        nn.ResidualBlock(16, 32, stride=2, seed=s[2]),
        nn.AvgPool2d(((h + 1) // 2, (w + 1) // 2)),  # global average pool
        nn.Flatten(),
        nn.Linear(32, num_classes, seed=s[3]),
    )


MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "lenet300": lenet300,
    "lenet5": lenet5,
    "cnn-bn": cnn_bn,
    "resnet-small": resnet_small,
}

# Defaults that train each model well from a bare `distnet train --model NAME`
# (tuned on the MNIST 7,000/1,000 split; see BENCHMARKS.md).
RECIPES: dict[str, dict[str, Any]] = {
    "lenet300": {"optimizer": "momentum", "lr": 0.05, "weight_decay": 1e-4, "batch_size": 64,
                 "epochs": 30, "schedule": "cosine", "warmup_steps": 100, "augment": "shift"},
    "lenet5": {"optimizer": "momentum", "lr": 0.03, "weight_decay": 5e-4, "batch_size": 64,
               "epochs": 20, "schedule": "cosine", "warmup_steps": 100, "augment": "shift"},
    "cnn-bn": {"optimizer": "momentum", "lr": 0.05, "weight_decay": 5e-4, "batch_size": 64,
               "epochs": 15, "schedule": "cosine", "warmup_steps": 100, "augment": "shift"},
    "resnet-small": {"optimizer": "momentum", "lr": 0.05, "weight_decay": 5e-4,
                     "batch_size": 64, "epochs": 15, "schedule": "cosine",
                     "warmup_steps": 100, "augment": "shift"},
}


def build_model(name: str, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                seed: int | None = 0) -> nn.Sequential:
    """The zoo model ``name`` for inputs of ``input_shape`` (C, H, W)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 1:  # flat vectors: treat as one-row images so every model sees (C, H, W)
        shape = (1, 1, shape[0])
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) or (D,), got {input_shape}")
    return MODELS[name](shape, num_classes, seed=seed)


def recipe(name: str) -> dict[str, Any]:
    """A copy of the default training recipe of model ``name``."""
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def _seeds(seed: int | None, n: int) -> list[int | None]:
    if seed is None:
        return [None] * n
    return [seed * 1000 + i for i in range(n)]
