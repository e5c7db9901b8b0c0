"""Batch-norm folding for inference: Conv/Linear followed by BatchNorm becomes one layer.

In eval mode BatchNorm is the affine map ``y = (x - mean) * g / sqrt(var + eps) + beta``
per channel, so after a layer ``x = W u + b`` it folds into ``W' = W * s`` (each
output row scaled by ``s = g / sqrt(var + eps)``) and ``b' = (b - mean) * s + beta``.
The folded model computes the same function as the original in eval mode (up to
float32 rounding) with one layer and one pass over the activations fewer, and the
compressed file no longer stores the four BN vectors. Training a folded model is
training a different parametrisation: fold last.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Module, Sequential

_FOLDABLE = {"Linear": "BatchNorm1d", "Conv2d": "BatchNorm2d"}


def fold_pair(layer: Module, bn: Module) -> Module:
    """A new Linear/Conv2d equal (in eval mode) to ``bn(layer(x))``; the inputs are unchanged."""
    kind = type(layer).__name__
    if _FOLDABLE.get(kind) != type(bn).__name__:
        raise TypeError(f"cannot fold {type(bn).__name__} into {kind}")
    w = np.asarray(backend.to_host(layer.weight.data), np.float64)
    if w.shape[0] != bn.num_features:
        raise ValueError(f"{kind} has {w.shape[0]} outputs, {type(bn).__name__} "
                         f"{bn.num_features} features")
    gamma = np.asarray(backend.to_host(bn.weight.data), np.float64)
    beta = np.asarray(backend.to_host(bn.bias.data), np.float64)
    mean = np.asarray(backend.to_host(bn.running_mean), np.float64)
    var = np.asarray(backend.to_host(bn.running_var), np.float64)
    s = gamma / np.sqrt(var + bn.eps)
    b = (np.zeros(w.shape[0]) if layer.bias is None
         else np.asarray(backend.to_host(layer.bias.data), np.float64))
    new = type(layer)(**{**layer.get_config(), "bias": True})
    xp = backend.get_array_module(layer.weight.data)
    dtype = layer.weight.data.dtype
    new.weight.data = xp.asarray((w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(dtype))
    new.bias.data = xp.asarray(((b - mean) * s + beta).astype(dtype))
    for p in (new.weight, new.bias):
        p.grad = xp.zeros_like(p.data)
    if layer.weight.mask is not None:  # a pruned weight stays pruned: zero rows scale to zero
        new.weight.mask = layer.weight.mask.copy()
    if hasattr(layer, "input_grad"):
        new.input_grad = layer.input_grad
    new.train(layer.training)
    return new


def fold_batchnorm(model: Module) -> list[str]:
    """Fold every BatchNorm that directly follows a Conv2d/Linear in ``model`` (a Sequential,
    searched recursively through nested Sequentials) in place; returns the folded names."""
    folded: list[str] = []
    for prefix, mod in list(model.named_modules()):
        if not isinstance(mod, Sequential):
            continue
        i = 0
        while i < len(mod) - 1:
            layer, nxt = mod[i], mod[i + 1]
            if _FOLDABLE.get(type(layer).__name__) == type(nxt).__name__:
                names = list(mod._modules)
                folded.append(".".join(filter(None, [prefix, names[i]])) + "+" + names[i + 1])
                mod.replace(i, fold_pair(layer, nxt))
                mod.replace(i + 1)  # drop the batch norm
            i += 1
    return folded


def fold_report(model: Module) -> dict[str, Any]:
    """How many BatchNorm layers ``model`` still has (what folding would remove)."""
    names = [n for n, m in model.named_modules() if type(m).__name__.startswith("BatchNorm")]
    return {"batchnorm_layers": len(names), "names": names}
