"""Structured pruning: remove whole neurons (Linear rows) or conv filters, shrinking the shapes.

Unlike masks, this makes the dense model smaller and faster. Removing output unit
``j`` of layer ``i`` of a ``Sequential`` also removes what depends on it: the
following batch norm's channel ``j``, and the next Linear's column ``j`` (or, after
a ``Flatten`` of conv maps, its block of H*W columns), or the next Conv2d's input
channel ``j``. Units are ranked by the L2 norm of their weights (rows) for Linear
and the L1 norm for conv filters (Li et al., 2017).

Layers are rebuilt from ``get_config()`` with new sizes, so ``to_spec()`` describes
the smaller model and a .dcz file or checkpoint rebuilds it. Optimizers hold the
old Parameters: build a new one after structured pruning.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compression.prune import Amount, validate_amount
from distnet import backend
from distnet.nn.module import Module, Parameter, Sequential

# Layers a unit passes through unchanged, channel by channel.
PASS_THROUGH = {"ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Dropout", "MaxPool2d", "AvgPool2d",
                "Identity"}
_OUT_KEYS = ("out_features", "out_channels")
_IN_KEYS = ("in_features", "in_channels")


def _key(cfg: dict[str, Any], keys: tuple[str, ...], layer: Module) -> str:
    for k in keys:
        if k in cfg:
            return k
    raise TypeError(f"{type(layer).__name__} has none of {keys}: cannot prune its units")


def _rebuilt(layer: Module, changes: dict[str, Any], slices: dict[str, Any]) -> Module:
    """A copy of ``layer`` with config ``changes``; each parameter/buffer sliced by ``slices``."""
    new = type(layer)(**{**layer.get_config(), **changes})
    for name, p in layer._parameters.items():
        if p is None:
            continue
        idx = slices.get(name, ...)
        q: Parameter = getattr(new, name)
        q.data = p.data[idx].copy()
        q.grad = backend.get_array_module(q.data).zeros_like(q.data)
        if p.mask is not None:
            q.mask = p.mask[idx].copy()
    for name, b in layer._buffers.items():
        new.set_buffer(name, b[slices.get(name, ...)].copy())
    new.train(layer.training)
    if hasattr(layer, "input_grad"):  # skip_input_grad's setting survives the rebuild
        new.input_grad = layer.input_grad
    return new


def unit_scores(layer: Module) -> np.ndarray:
    """Importance of each output unit: L2 norm of Linear rows, L1 norm of conv filters."""
    w = np.asarray(backend.to_host(layer.weight.data), np.float64)
    flat = w.reshape(w.shape[0], -1)
    return np.abs(flat).sum(axis=1) if w.ndim > 2 else np.sqrt((flat**2).sum(axis=1))


def prune_units(model: Sequential, index: int, amount: Amount,
                keep: np.ndarray | None = None) -> np.ndarray:
    """Remove ``amount`` (count or fraction) of the output units of ``model[index]``.

    The weakest units go (see ``unit_scores``), unless ``keep`` (sorted indices)
    says which stay. Returns the kept indices. Raises ValueError when the layer has
    no consumer (the model's outputs would change meaning) or when a layer between
    it and its consumer cannot be sliced.
    """
    layers = model.layers
    if not 0 <= index < len(layers):
        raise IndexError(f"layer {index} out of range for a model of {len(layers)} layers")
    layer = layers[index]
    cfg = layer.get_config()
    out_key = _key(cfg, _OUT_KEYS, layer)
    n_out = int(cfg[out_key])
    if keep is None:
        n_keep = n_out - validate_amount(amount, n_out)
        if n_keep < 1:
            raise ValueError(f"layer {index}: pruning {amount} would remove all {n_out} units")
        keep = np.sort(np.argsort(-unit_scores(layer), kind="stable")[:n_keep])
    keep = np.asarray(keep, dtype=np.int64)
    new_layers: dict[int, Module] = {
        index: _rebuilt(layer, {out_key: int(keep.size)}, {"weight": keep, "bias": keep})}
    spatial = None  # set after a Flatten: each channel became a block of columns
    for j in range(index + 1, len(layers)):
        nxt = layers[j]
        kind = type(nxt).__name__
        if kind in PASS_THROUGH:
            continue
        if kind == "Flatten":
            spatial = True
            continue
        ncfg = nxt.get_config()
        if kind.startswith("BatchNorm") and spatial is None:
            s = {n: keep for n in ("weight", "bias", "running_mean", "running_var")}
            new_layers[j] = _rebuilt(nxt, {"num_features": int(keep.size)}, s)
            continue
        in_key = next((k for k in _IN_KEYS if k in ncfg), None)
        if in_key is None:
            raise ValueError(f"cannot prune units of layer {index}: layer {j} ({kind}) "
                             "depends on them and cannot be sliced")
        cols = keep
        if spatial is not None:
            block = int(ncfg[in_key]) // n_out
            cols = (keep[:, None] * block + np.arange(block)[None, :]).ravel()
        new_layers[j] = _rebuilt(nxt, {in_key: int(cols.size)}, {"weight": (slice(None), cols)})
        break
    else:
        raise ValueError(f"layer {index} is the model's last layer with parameters: its units "
                         "are the outputs and cannot be pruned")
    for j, new in new_layers.items():
        # replace() keeps the order; Sequential.__setitem__ re-registers the name last.
        model.replace(j, new)
    return keep


def prune_units_model(model: Sequential, spec: dict[int, Amount]) -> dict[int, int]:
    """Apply ``prune_units`` per layer index (``{index: amount}``); returns kept counts."""
    kept = {}
    for index in sorted(spec):
        kept[index] = int(prune_units(model, int(index), spec[index]).size)
    return kept
