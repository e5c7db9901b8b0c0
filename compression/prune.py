"""Magnitude pruning (Deep Compression, stage 1): per layer, global, by threshold, gradual.

A pruned entry has mask 0 on its ``Parameter`` (``p.set_mask`` multiplies masks, so
pruning again only removes more); the optimizer keeps masked entries at zero, so
retraining works on the surviving weights. ``amount`` is the *target sparsity* of
the whole tensor: an int (entries pruned) or a float in [0, 1] (fraction pruned),
counting entries pruned before, so ``prune(p, 0.5)`` then ``prune(p, 0.8)`` leaves
80% zeros. By default weights (ndim >= 2) are pruned and biases are not.

Structured pruning (whole neurons and filters, which shrinks the dense shapes) is in
``compression.structured``; the per-layer sensitivity scan in ``compression.sensitivity``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Module, Parameter

Amount = int | float


def validate_amount(amount: Amount, size: int, what: str = "amount") -> int:
    """The number of entries ``amount`` names out of ``size``: int count or float fraction."""
    if isinstance(amount, bool) or not isinstance(amount, int | float | np.integer | np.floating):
        raise TypeError(f"{what} must be an int (count) or a float (fraction), "
                        f"got {type(amount).__name__}")
    if isinstance(amount, int | np.integer):
        if not 0 <= amount <= size:
            raise ValueError(f"{what}={amount} entries is outside [0, {size}]")
        return int(amount)
    if not (0.0 <= float(amount) <= 1.0):
        raise ValueError(f"{what}={amount} as a fraction must be in [0, 1]")
    return int(round(float(amount) * size))


def magnitude_mask(w: Any, n_prune: int, mask: Any = None) -> np.ndarray:
    """0/1 mask (w's shape, float32) that zeroes the ``n_prune`` smallest |w|.

    Entries already masked count as the smallest, so they are pruned first and a
    smaller ``n_prune`` than before keeps them pruned (the masks combine).
    """
    a = np.abs(np.asarray(backend.to_host(w), np.float64)).ravel()
    if mask is not None:
        a[np.asarray(backend.to_host(mask)).ravel() == 0] = -1.0
    out = np.ones(a.size, dtype=np.float32)
    if n_prune > 0:
        out[np.argpartition(a, n_prune - 1)[:n_prune]] = 0  # exact count, even with ties
    return out.reshape(np.shape(w))


def sparsity(p: Parameter) -> float:
    """Fraction of ``p``'s entries that are pruned (mask 0), or zero when unmasked."""
    if p.mask is None:
        return float(np.mean(backend.to_host(p.data) == 0))
    return 1.0 - float(backend.to_host(p.mask).mean())


def prune_param(p: Parameter, amount: Amount | None = None, *, q: float | None = None) -> float:
    """Prune ``p`` to ``amount`` (target sparsity) or, with ``q``, by Han's threshold:
    |w| < q * std(surviving w). Returns the sparsity reached."""
    if (amount is None) == (q is None):
        raise ValueError("give exactly one of amount (target sparsity) and q (threshold quality)")
    w = backend.to_host(p.data)
    if q is not None:
        if q < 0:
            raise ValueError(f"threshold quality q must be >= 0, got {q}")
        kept = w if p.mask is None else w[backend.to_host(p.mask) != 0]
        thr = float(q) * float(np.std(kept)) if kept.size else 0.0
        mask = (np.abs(w) >= thr).astype(np.float32)
    else:
        mask = magnitude_mask(w, validate_amount(amount, p.size), p.mask)
    p.set_mask(backend.get_array_module(p.data).asarray(mask))
    return sparsity(p)


def prunable(model: Module, include_bias: bool = False) -> dict[str, Parameter]:
    """The parameters pruning applies to: weights (ndim >= 2) of every layer, biases if asked."""
    return {n: p for n, p in model.named_parameters()
            if p.data.ndim >= 2 or (include_bias and n.endswith("bias"))}


def layer_aliases(model: Module, include_bias: bool = False) -> dict[str, str]:
    """Names users may give a prunable weight, mapped to its parameter name.

    ``"2.weight"``; the layer's name in its Sequential (``"2"``); its rank among the
    prunable weights (``"#0"``, ``"#1"``, ...); ``convN`` / ``fcN`` (1-based, counting
    4-d and 2-d weights separately, as the papers name LeNet's layers).
    """
    aliases: dict[str, str] = {}
    counts = {"conv": 0, "fc": 0}
    for i, (name, p) in enumerate(prunable(model, include_bias).items()):
        aliases[name] = name
        aliases[f"#{i}"] = name
        if name.endswith(".weight"):
            aliases[name[: -len(".weight")]] = name
            kind = "conv" if p.data.ndim == 4 else "fc" if p.data.ndim == 2 else None
            if kind:
                counts[kind] += 1
                aliases[f"{kind}{counts[kind]}"] = name
    return aliases


def resolve_key(model: Module, key: Any, include_bias: bool = False) -> str:
    """The parameter name that a layer key (see ``layer_aliases``) denotes; KeyError if none."""
    aliases = layer_aliases(model, include_bias)
    name = aliases.get(str(key).strip())
    if name is None:
        raise KeyError(f"no prunable layer {key!r}: use one of "
                       f"{sorted(k for k in aliases if not k.startswith('#'))} or #0..#"
                       f"{len(prunable(model, include_bias)) - 1}")
    return name


def resolve_targets(model: Module, spec: Any, include_bias: bool = False) -> dict[str, Any]:
    """``{param_name: amount}`` from a spec: one amount for all; ``{layer key: amount}``
    (keys as in ``layer_aliases``); ``{"q": ...}`` (or ``"q=0.8"``) for Han's threshold.
    A ``("q", value)`` amount is a threshold for that layer alone.
    """
    params = prunable(model, include_bias)
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return {n: spec for n in params}
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if not isinstance(spec, dict):
        raise TypeError(f"pruning spec must be a number, a dict or a string, got {spec!r}")
    if set(spec) == {"q"}:
        return {n: ("q", float(spec["q"])) for n in params}
    return {resolve_key(model, key, include_bias): amount for key, amount in spec.items()}


def parse_spec(text: str) -> Any:
    """``"0.92"`` -> 0.92; ``"q=0.8"`` -> {"q": 0.8}; ``"fc1:0.9,4:0.8"`` -> {"fc1": 0.9, "4": 0.8}.

    A value with a ``q`` prefix (``"2:q1.2"``) is a threshold quality for that layer.
    """
    text = text.strip()
    if text.startswith("q="):
        return {"q": float(text[2:])}
    if ":" not in text:
        return _number(text)
    out: dict[str, Any] = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = part.partition(":")
        value = value.strip()
        out[key.strip()] = ("q", float(value[1:])) if value.startswith("q") else _number(value)
    return out


def _number(text: str) -> int | float:
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        raise ValueError(f"not a pruning amount: {text!r} (expected e.g. 0.9, 300 or q=0.8)"
                         ) from None


def prune_model(model: Module, spec: Any, include_bias: bool = False) -> dict[str, float]:
    """Prune per layer by ``spec`` (see ``resolve_targets``); returns sparsity per parameter."""
    params = dict(model.named_parameters())
    out = {}
    for name, amount in resolve_targets(model, spec, include_bias).items():
        if isinstance(amount, tuple):
            out[name] = prune_param(params[name], q=amount[1])
        else:
            out[name] = prune_param(params[name], amount)
    return out


def global_prune(model: Module, amount: Amount, names: Iterable[str] | None = None
                 ) -> dict[str, float]:
    """Prune ``amount`` of all chosen weights together by one magnitude threshold: layers
    with many small weights lose more. Returns sparsity per parameter."""
    params = dict(model.named_parameters())
    chosen = list(names) if names is not None else list(prunable(model))
    sizes = [params[n].size for n in chosen]
    flat = np.concatenate([backend.to_host(params[n].data).ravel() for n in chosen])
    prior = np.concatenate([np.ones(params[n].size, np.float32) if params[n].mask is None
                            else backend.to_host(params[n].mask).ravel() for n in chosen])
    mask = magnitude_mask(flat, validate_amount(amount, flat.size), prior)
    out = {}
    for name, part in zip(chosen, np.split(mask, np.cumsum(sizes)[:-1]), strict=True):
        p = params[name]
        p.set_mask(backend.get_array_module(p.data).asarray(part.reshape(p.shape)))
        out[name] = sparsity(p)
    return out


def agp_sparsity(step: int, final: float, initial: float = 0.0, begin: int = 0,
                 end: int = 10) -> float:
    """Zhu & Gupta's cubic schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))**3."""
    if end <= begin:
        return final
    t = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return final + (initial - final) * (1.0 - t) ** 3


def gradual_prune(model: Module, targets: dict[str, float], steps: int,
                  retrain: Callable[[int], Any] | None = None, initial: float = 0.0,
                  on_step: Callable[[int, dict[str, float]], Any] | None = None
                  ) -> dict[str, float]:
    """Automated gradual pruning: ``steps`` pruning rounds following the cubic schedule
    towards ``targets`` ({param: final sparsity}), with ``retrain(round)`` after each.

    Masks combine, so each round only removes more weights.
    """
    if steps < 1:
        raise ValueError(f"gradual pruning needs at least one step, got {steps}")
    params = dict(model.named_parameters())
    reached: dict[str, float] = {}
    for k in range(1, steps + 1):
        for name, final in targets.items():
            s = agp_sparsity(k, float(final), initial, 0, steps)
            reached[name] = prune_param(params[name], s)
        if on_step is not None:
            on_step(k, dict(reached))
        if retrain is not None:
            retrain(k)
    return reached
