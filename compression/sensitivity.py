"""Per-layer pruning sensitivity: accuracy against sparsity, one layer at a time.

Han et al. (2015) choose each layer's pruning rate from such curves: a layer whose
accuracy holds up to 95% sparsity can be pruned hard; a sensitive one (the first
conv, the last fc) lightly. ``propose_sparsities`` picks, per layer, the highest
sparsity whose accuracy stays within a tolerance of the unpruned model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from compression.prune import prunable, prune_param
from distnet.nn.module import Module

DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


def sensitivity_scan(model: Module, score: Callable[[Module], float],
                     sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                     names: Sequence[str] | None = None, progress: bool = True
                     ) -> dict[str, Any]:
    """Prune each weight alone to each sparsity, score the model (e.g. validation
    accuracy), restore it. Returns ``{"baseline": s0, "layers": {name: [[sparsity,
    score], ...]}}``. The model is left exactly as it was (values and masks).
    """
    params = prunable(model) if names is None else {
        n: p for n, p in model.named_parameters() if n in set(names)}
    if names is not None and len(params) != len(set(names)):
        raise KeyError(f"unknown parameters {sorted(set(names) - set(params))}")
    levels = sorted(float(s) for s in sparsities)
    for s in levels:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sparsities must be fractions in [0, 1], got {s}")
    baseline = float(score(model))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(params) * len(levels), desc="sensitivity", unit="eval",
                   leave=False, dynamic_ncols=True)
    layers: dict[str, list[list[float]]] = {}
    try:
        for name, p in params.items():
            data = p.data.copy()
            mask = None if p.mask is None else p.mask.copy()
            curve = []
            for s in levels:
                prune_param(p, s)
                curve.append([s, float(score(model))])
                p.data[...] = data  # restore before the next level: levels do not accumulate
                p.mask = None if mask is None else mask.copy()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(layer=name, sparsity=s, score=f"{curve[-1][1]:.4f}",
                                    refresh=False)
            layers[name] = curve
    finally:
        if bar is not None:
            bar.close()
    return {"baseline": baseline, "layers": layers}


def propose_sparsities(scan: dict[str, Any], tolerance: float) -> dict[str, float]:
    """Per layer, the highest scanned sparsity whose score is at least baseline - tolerance
    (and every lower level's too, so a noisy dip is not skipped over); 0.0 if none."""
    base = float(scan["baseline"])
    out = {}
    for name, curve in scan["layers"].items():
        best = 0.0
        for s, value in sorted(curve):
            if value < base - tolerance:
                break
            best = float(s)
        out[name] = best
    return out


def format_scan(scan: dict[str, Any]) -> str:
    """The scan as a table: one row per layer, one column per sparsity."""
    layers = scan["layers"]
    if not layers:
        return "(no layers scanned)"
    levels = [s for s, _ in next(iter(layers.values()))]
    width = max(len(n) for n in layers) + 2
    head = "layer".ljust(width) + "".join(f"{100 * s:>7.0f}%" for s in levels)
    rows = [head, "-" * len(head)]
    for name, curve in layers.items():
        rows.append(name.ljust(width) + "".join(f"{100 * v:>8.2f}" for _, v in curve))
    rows.append(f"baseline: {100 * scan['baseline']:.2f}")
    return "\n".join(rows)


