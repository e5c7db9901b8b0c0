"""Low-rank factorisation by truncated SVD: one layer becomes two thinner ones.

Linear: W (out, in) ~ U_r S_r V_r^T becomes ``Linear(in, r, bias=False)`` with
weight sqrt(S_r) V_r^T followed by ``Linear(r, out)`` with weight U_r sqrt(S_r) and
the original bias (splitting S evenly keeps both factors on the same scale, which
helps fine-tuning). Conv2d (out, in, kh, kw): the SVD of W reshaped to
(out, in*kh*kw) gives a kh x kw conv with r filters (same stride and padding, no
bias) followed by a 1x1 conv with the original bias.

The Frobenius error of the truncation is sqrt(sum of the dropped S_i**2)
(Eckart-Young): ``factorize`` reports it. Rank from ``rank``, from a target
``ratio`` of parameters kept, or from the fraction ``energy`` of sum S**2 kept.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Module, Sequential


def choose_rank(s: np.ndarray, rows: int, cols: int, rank: int | None = None,
                ratio: float | None = None, energy: float | None = None) -> int:
    """Rank for singular values ``s`` of a (rows, cols) matrix; exactly one criterion.

    ratio: the two factors hold at most ``ratio`` of rows*cols parameters;
    energy: the smallest r with sum(s[:r]**2) >= energy * sum(s**2).
    """
    if sum(x is not None for x in (rank, ratio, energy)) != 1:
        raise ValueError("give exactly one of rank, ratio and energy")
    full = int(s.size)
    if rank is not None:
        r = int(rank)
    elif ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        r = int(ratio * rows * cols // (rows + cols))
    else:
        if not 0 < energy <= 1:  # type: ignore[operator]
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        e = np.cumsum(s.astype(np.float64) ** 2)
        r = int(np.searchsorted(e, energy * e[-1] * (1 - 1e-12)) + 1)  # type: ignore[operator]
    if not 1 <= r:
        raise ValueError(f"rank {r} too small: a factor needs at least rank 1")
    return min(r, full)


def truncated_svd(w2d: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(A (rows, r), B (r, cols), singular values, Frobenius error) with A @ B ~ w2d."""
    u, s, vt = np.linalg.svd(np.asarray(w2d, np.float64), full_matrices=False)
    root = np.sqrt(s[:r])
    err = float(np.sqrt(np.sum(s[r:] ** 2)))
    return u[:, :r] * root, root[:, None] * vt[:r], s, err


def factorize(layer: Module, rank: int | None = None, ratio: float | None = None,
              energy: float | None = None) -> tuple[list[Module], dict[str, Any]]:
    """Replace a Linear or Conv2d by two layers; returns (layers, stats).

    stats: rank, params before/after, Frobenius and relative reconstruction error,
    the singular values and the seconds the SVD took.
    """
    kind = type(layer).__name__
    if kind not in ("Linear", "Conv2d"):
        raise TypeError(f"low-rank factorisation handles Linear and Conv2d, not {kind}")
    t0 = time.perf_counter()
    w = np.asarray(backend.to_host(layer.weight.data), np.float64)
    w2d = w.reshape(w.shape[0], -1)
    s_all = np.linalg.svd(w2d, compute_uv=False)
    r = choose_rank(s_all, *w2d.shape, rank=rank, ratio=ratio, energy=energy)
    a, b, s, err = truncated_svd(w2d, r)
    cfg = layer.get_config()
    xp = backend.get_array_module(layer.weight.data)
    dtype = layer.weight.data.dtype
    if kind == "Linear":
        first = type(layer)(**{**cfg, "out_features": r, "bias": False})
        second = type(layer)(**{**cfg, "in_features": r})
        first.weight.data = xp.asarray(b.astype(dtype))
    else:
        first = type(layer)(**{**cfg, "out_channels": r, "bias": False})
        second = type(layer)(**{**cfg, "in_channels": r, "kernel_size": 1, "stride": 1,
                                "padding": 0})
        first.weight.data = xp.asarray(b.reshape((r,) + w.shape[1:]).astype(dtype))
    second.weight.data = xp.asarray(a.reshape(second.weight.shape).astype(dtype))
    for new in (first, second):
        new.weight.grad = xp.zeros_like(new.weight.data)
    if layer.bias is not None:
        second.bias.data = layer.bias.data.copy()
    if hasattr(layer, "input_grad"):
        first.input_grad = layer.input_grad
    before = layer.num_parameters()
    after = first.num_parameters() + second.num_parameters()
    norm = float(np.linalg.norm(w2d))
    stats = {"kind": kind, "rank": r, "full_rank": int(s_all.size), "params_before": before,
             "params_after": after, "frobenius_error": err,
             "relative_error": err / norm if norm else 0.0,
             "energy_kept": float(np.sum(s[:r] ** 2) / max(np.sum(s**2), 1e-300)),
             "seconds": time.perf_counter() - t0}
    return [first, second], stats


def parse_lowrank(text: str) -> dict[str, dict[str, float]]:
    """``"2:r=40,4:ratio=0.3"`` / ``"ratio=0.25"`` / ``"energy=0.9"`` -> ``{layer: {criterion:
    value}}``; a key ``"*"`` applies to every Linear/Conv2d layer but the last."""
    out: dict[str, dict[str, float]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        layer, _, crit = part.rpartition(":")
        name, _, value = crit.partition("=")
        name = {"r": "rank", "rank": "rank", "ratio": "ratio", "energy": "energy"}.get(name)
        if name is None or not value:
            raise ValueError(f"bad low-rank spec {part!r}: expected [LAYER:]r=N, ratio=F or "
                             "energy=F")
        out[layer or "*"] = {name: int(value) if name == "rank" else float(value)}
    return out


def factorize_model(model: Sequential, spec: dict[str, dict[str, float]] | str
                    ) -> dict[str, dict[str, Any]]:
    """Factorise the layers of a Sequential named in ``spec`` (see ``parse_lowrank``).

    Layers are replaced in place (later indices first, so earlier ones keep theirs);
    a factorisation that would not save parameters is skipped. Returns stats per
    original layer index. Build a new optimizer afterwards.
    """
    if isinstance(spec, str):
        spec = parse_lowrank(spec)
    layers = model.layers
    candidates = [i for i, m in enumerate(layers) if type(m).__name__ in ("Linear", "Conv2d")]
    chosen: dict[int, dict[str, float]] = {}
    for key, crit in spec.items():
        if key == "*":
            chosen.update({i: crit for i in candidates[:-1] if i not in chosen})
        else:
            i = int(key)
            if i not in candidates:
                raise ValueError(f"layer {i} is not a Linear or Conv2d (those are {candidates})")
            chosen[i] = crit
    report: dict[str, dict[str, Any]] = {}
    for i in sorted(chosen, reverse=True):
        pair, stats = factorize(layers[i], **chosen[i])
        stats["applied"] = stats["params_after"] < stats["params_before"]
        if stats["applied"]:
            model.replace(i, *pair)
        report[str(i)] = stats
    return dict(sorted(report.items(), key=lambda kv: int(kv[0])))
