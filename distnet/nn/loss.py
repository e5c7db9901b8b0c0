"""Losses: ``loss = criterion(pred, target)`` (a Python float), then ``criterion.backward()``.

Each loss computes its gradient during the forward pass, into a workspace, so
backward is free and nothing the size of ``pred`` is allocated per step. The value
returned by backward is ``d loss / d pred``, valid until the next call.
"""

from __future__ import annotations

from typing import Any

from distnet import backend
from distnet.nn.module import Module


class Loss(Module):
    """Base class: ``__call__(pred, target) -> float``; ``backward() -> d loss / d pred``."""

    def __call__(self, pred: Any, target: Any) -> float:  # type: ignore[override]
        return self.forward(pred, target)

    def forward(self, pred: Any, target: Any) -> float:  # type: ignore[override]
        raise NotImplementedError

    def backward(self, grad_out: Any = None) -> Any:
        """``d loss / d pred`` (pred's shape and dtype), times ``grad_out`` when given."""
        grad = getattr(self, "_grad", None)
        if grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before the loss")
        if grad_out is None:
            return grad
        xp = backend.get_array_module(grad)
        return xp.multiply(grad, grad_out, out=self.workspace("scaled", grad.shape, grad.dtype, xp))

    def _classes(self, pred: Any, target: Any, xp: Any) -> Any:
        """Validate (N, C) pred with (N,) int class indices in [0, C); return xp.arange(N)."""
        name = type(self).__name__
        if pred.ndim != 2 or target.ndim != 1 or target.shape[0] != pred.shape[0]:
            raise ValueError(f"{name}: expected pred (N, C) and target (N,), got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        if target.dtype.kind not in "iu":
            raise TypeError(f"{name}: target must hold int64 class indices, got {target.dtype}")
        num_classes = pred.shape[1]
        if target.size and (int(target.min()) < 0 or int(target.max()) >= num_classes):
            raise ValueError(f"{name}: target class indices must be in [0, {num_classes}), "
                             f"got [{int(target.min())}, {int(target.max())}]")
        rows, n = self._workspace.get("rows"), pred.shape[0]
        if rows is None or rows.shape[0] != n or backend.get_array_module(rows) is not xp:
            rows = xp.arange(n)
            self._workspace["rows"] = rows
        return rows


class CrossEntropyLoss(Loss):
    """Mean over the batch of ``-log softmax(pred)[target]``, fused with its gradient.

    pred: (N, C) float logits; target: (N,) int64. Gradient: ``(softmax(pred) -
    onehot(target)) / N``, computed from the same exponentials as the loss.
    """

    def forward(self, pred: Any, target: Any) -> float:  # type: ignore[override]
        xp = backend.get_array_module(pred)
        target = xp.asarray(target)
        rows = self._classes(pred, target, xp)
        n = pred.shape[0]
        shift = pred.max(axis=1, keepdims=True)
        grad = self.workspace("grad", pred.shape, pred.dtype, xp)
        xp.subtract(pred, shift, out=grad)
        picked = grad[rows, target]  # shifted logit of the true class, (N,)
        xp.exp(grad, out=grad)
        total = grad.sum(axis=1, keepdims=True)
        # loss_i = log(sum_j exp(z_ij)) - z_i,target with z shifted by the row max.
        loss = float(xp.log(total).sum() - picked.sum()) / n
        total *= n
        grad /= total
        grad[rows, target] -= 1.0 / n
        self._grad = grad
        return loss


def _one_hot(module: Module, target: Any, pred: Any, xp: Any) -> Any:
    onehot = module.workspace("onehot", pred.shape, pred.dtype, xp)
    onehot.fill(0)
    onehot[module._classes(pred, target, xp), target] = 1
    return onehot


class MSELoss(Loss):
    """Mean over all elements of ``(pred - target)^2``, like ``torch.nn.MSELoss()``.

    pred: (N, ...) float; target: float of pred's shape, or (N,) int64 class indices
    for (N, C) pred, compared as one-hot vectors.
    """

    def forward(self, pred: Any, target: Any) -> float:  # type: ignore[override]
        xp = backend.get_array_module(pred)
        target = xp.asarray(target)
        if target.dtype.kind in "iu":
            target = _one_hot(self, target, pred, xp)
        elif target.shape != pred.shape:
            raise ValueError(f"MSELoss: expected target of pred's shape {tuple(pred.shape)} "
                             f"(or (N,) class indices), got {tuple(target.shape)}")
        grad = self.workspace("grad", pred.shape, pred.dtype, xp)
        xp.subtract(pred, target, out=grad)
        flat = grad.reshape(-1)
        loss = float(xp.dot(flat, flat)) / grad.size
        grad *= 2.0 / grad.size
        self._grad = grad
        return loss


class MultiMarginLoss(Loss):
    """Multiclass hinge loss (the multiclass SVM), like ``torch.nn.MultiMarginLoss``.

    ``loss_n = sum_{i != y} max(0, margin - pred[y] + pred[i])^p / C``, mean over
    the batch. pred: (N, C) float; target: (N,) int64; ``p`` is 1 or 2.
    """

    def __init__(self, p: int = 1, margin: float = 1.0) -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"MultiMarginLoss: p must be 1 or 2, got {p!r}")
        self.p = int(p)
        self.margin = float(margin)

    def get_config(self) -> dict[str, Any]:
        return {"p": self.p, "margin": self.margin}

    def forward(self, pred: Any, target: Any) -> float:  # type: ignore[override]
        xp = backend.get_array_module(pred)
        target = xp.asarray(target)
        rows = self._classes(pred, target, xp)
        n, c = pred.shape
        hinge = self.workspace("hinge", pred.shape, pred.dtype, xp)
        xp.subtract(pred, pred[rows, target][:, None], out=hinge)
        hinge += self.margin
        xp.maximum(hinge, 0, out=hinge)
        hinge[rows, target] = 0  # the true class is not a margin violation
        grad = self.workspace("grad", pred.shape, pred.dtype, xp)
        if self.p == 1:
            loss = float(hinge.sum())
            xp.greater(hinge, 0, out=grad)  # d/d pred[i] of max(0, .) is 1 where active
            grad *= 1.0 / (n * c)
        else:
            flat = hinge.reshape(-1)
            loss = float(xp.dot(flat, flat))
            xp.multiply(hinge, 2.0 / (n * c), out=grad)
        # The true class receives minus the sum of the violations' gradients.
        grad[rows, target] = -grad.sum(axis=1)
        self._grad = grad
        return loss / (n * c)
