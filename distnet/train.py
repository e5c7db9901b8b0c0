"""The training loop: one step, evaluation, and ``fit`` with a pluggable update.

The update that follows backward is a callable ``update(step)``: a local
optimizer (``LocalUpdate``) in one process, a parameter-server client or an MPI
allreduce in a distributed job. Everything else (batches, augmentation, progress,
metrics) is the same for all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from distnet import backend
from distnet.metrics import MetricsWriter
from distnet.nn.module import Module

Update = Callable[[int], None]


def train_step(model: Module, criterion: Any, x: Any, y: Any) -> float:
    """Forward and backward on one batch; gradients are left in each ``Parameter.grad``.

    x: (N, ...) float32, y: (N,) int64. Returns the mean loss of the batch.
    """
    loss = criterion(model.forward(x), y)
    model.backward(criterion.backward())
    return float(loss)


def evaluate(model: Module, dataset: Any, batch_size: int = 1000,
             criterion: Any = None) -> dict[str, float]:
    """Accuracy (fraction) and mean loss of ``model`` in eval mode over every example."""
    from distnet.nn import CrossEntropyLoss

    criterion = criterion or CrossEntropyLoss()
    was_training = model.training
    model.eval()
    device = model.device
    correct, total_loss, n = 0, 0.0, len(dataset)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    try:
        for start in range(0, n, batch_size):
            x = backend.to_device(dataset.x[start : start + batch_size], device)
            y = backend.to_device(dataset.y[start : start + batch_size], device)
            out = model.forward(x)
            total_loss += float(criterion(out, y)) * len(y)
            correct += int((out.argmax(axis=1) == y).sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / n, "loss": total_loss / n}


class LocalUpdate:
    """The single-process update: set the scheduled learning rate, then ``optimizer.step()``."""

    def __init__(self, optimizer: Any, schedule: Callable[[int], float] | None = None) -> None:
        self.optimizer = optimizer
        self.schedule = schedule

    def __call__(self, step: int) -> None:
        if self.schedule is not None:
            self.optimizer.lr = self.schedule(step)
        self.optimizer.step()


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def fit(model: Module, train: Any, val: Any | None, *, epochs: int, batch_size: int,
        criterion: Any, update: Update, seed: int = 0,
        augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        metrics: MetricsWriter | None = None, progress: bool = True, start_epoch: int = 0,
        start_step: int = 0, log_every: int = 10,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        desc: str = "train") -> list[dict[str, Any]]:
    """Train for ``epochs`` epochs; returns one summary dict per epoch.

    Each epoch shuffles with ``seed`` and the epoch number, so a run is
    reproducible and a resumed run sees the same batches: ``start_step`` skips the
    global steps already taken (a job restarted from server checkpoints).
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch size >= 1 (got {epochs}, {batch_size})")
    device = model.device
    rng = np.random.default_rng(seed + 7919)
    per_epoch = steps_per_epoch(len(train), batch_size)
    history: list[dict[str, Any]] = []
    model.train()
    for epoch in range(start_epoch, start_epoch + epochs):
        if (epoch + 1) * per_epoch <= start_step:
            continue  # taken before the restart
        bar = _progress(per_epoch, f"{desc} epoch {epoch + 1}/{start_epoch + epochs}", progress)
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for i, (xb, yb) in enumerate(train.batches(batch_size, shuffle=True, seed=seed,
                                                   epoch=epoch)):
            step = epoch * per_epoch + i
            if step < start_step:
                if bar is not None:
                    bar.update(1)
                continue
            if augment is not None:
                xb = augment(xb, rng)
            loss = train_step(model, criterion, backend.to_device(xb, device),
                              backend.to_device(yb, device))
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at epoch {epoch + 1} step {i}: "
                                         "lower the learning rate or check the data")
            update(step)
            seen += len(yb)
            loss_sum += loss * len(yb)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            if metrics is not None and (i % log_every == 0 or i == per_epoch - 1):
                metrics.write(kind="step", epoch=epoch + 1, step=step, loss=loss,
                              samples_per_s=rate)
        if bar is not None:
            bar.close()
        summary: dict[str, Any] = {
            "kind": "epoch", "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
            "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9),
            "seconds": time.perf_counter() - t0,
        }
        if val is not None and len(val):
            result = evaluate(model, val)
            summary.update(val_accuracy=result["accuracy"], val_loss=result["loss"])
        if metrics is not None:
            metrics.write(**summary)
        history.append(summary)
        if on_epoch_end is not None:
            on_epoch_end(summary)
    return history


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def batches_of(dataset: Any, batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Batches in order, without shuffling (evaluation, calibration)."""
    for start in range(0, len(dataset), batch_size):
        yield dataset.x[start : start + batch_size], dataset.y[start : start + batch_size]
