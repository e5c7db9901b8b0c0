"""Compression figures: per-layer bars, stages, weight histograms with shared values,
pruning sensitivity.

The report (``compression.report.build_report``) has the per-layer table, the
stages and each shared layer's codebook, but not the weights the codebook was fit
to (``Pipeline.pre_share`` is not saved). The histogram therefore takes its
weights from what the run directory holds, best first: a trained dense checkpoint
(``.npz``) with the layer, restricted to the positions the ``.dcz`` kept (the
distribution k-means saw, before retraining moved it a little); else the ``.dcz``
itself, whose weights all equal shared values (a count per shared value).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distnet.plots.runs import number
from distnet.plots.style import NoData, grouped_bars, legend, new_figure, save

MAX_HIST_LAYERS = 4
MAX_SHARED = 256  # more distinct kept values than this: the layer is not shared


def _weight_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's weight layers (2-d and up), as Deep Compression's tables show them."""
    rows = [r for r in report["layers"] if isinstance(r, dict) and "name" in r]
    weights = [r for r in rows if len(r.get("shape") or []) >= 2]
    return weights or rows


def _get(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [number(r.get(key)) or 0.0 for r in rows]


def layers_figure(report: dict[str, Any], path: Path) -> Path:
    """Per layer: % of weights kept, bits per kept weight, compression rate."""
    rows = _weight_rows(report)
    if not rows:
        raise NoData("the compression report has no layers")
    names = [f"{r['name']}\n{'x'.join(str(d) for d in r.get('shape') or [])}" for r in rows]
    fig, (kept, bits, rate) = new_figure(1, 3, 16, 4.6)
    grouped_bars(kept, names, {"kept": _get(rows, "kept_pct")}, ["tab:green"], "%.1f")
    kept.set(title="Weights kept after pruning", ylabel="weights kept (%)", ylim=(0, 110))
    grouped_bars(bits, names, {
        "value index, fixed width (P+Q)": _get(rows, "weight_bits_pq"),
        "value index, Huffman (P+Q+H)": _get(rows, "weight_bits_pqh"),
        "position index, fixed width": _get(rows, "index_bits_pq"),
        "position index, Huffman": _get(rows, "index_bits_pqh"),
    }, ["tab:blue", "lightsteelblue", "tab:orange", "navajowhite"], "%.1f")
    bits.set(title="Bits per kept weight", ylabel="bits per kept weight")
    grouped_bars(rate, names, {"fixed width (P+Q)": _get(rows, "ratio_pq"),
                               "Huffman (P+Q+H)": _get(rows, "ratio_pqh")},
                 ["tab:purple", "plum"], "%.1fx")
    rate.set(title="Compression rate per layer", ylabel="dense float32 bytes / stored bytes")
    for ax in (kept, bits, rate):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize="small")
    legend(bits)
    legend(rate)
    fig.suptitle(_headline(report))
    return save(fig, path)


def _headline(report: dict[str, Any]) -> str:
    parts = []
    if number(report.get("ratio")) is not None:
        parts.append(f"{report['ratio']:.1f}x smaller"
                     + (f" ({report['file_bytes']:,} B)" if "file_bytes" in report else ""))
    if number(report.get("weights_kept_pct")) is not None:
        parts.append(f"{report['weights_kept_pct']:.1f}% of weights kept")
    acc = report.get("accuracy") or {}
    if number(acc.get("baseline")) is not None and number(acc.get("final")) is not None:
        parts.append(f"accuracy {100 * acc['baseline']:.2f}% -> {100 * acc['final']:.2f}%")
    return "Deep Compression: " + ", ".join(parts) if parts else "Compression by layer"


def stages_figure(report: dict[str, Any], path: Path) -> Path:
    """Accuracy and .dcz size after each stage of the pipeline."""
    stages = [s for s in report.get("stages") or []
              if isinstance(s, dict) and number(s.get("accuracy")) is not None]
    if not stages:
        raise NoData("the compression report has no stages")
    names = [str(s.get("stage", i)) for i, s in enumerate(stages)]
    fig, (acc, size) = new_figure(1, 2, 12, 4.2)
    accuracy = [100 * s["accuracy"] for s in stages]
    acc.plot(range(len(stages)), accuracy, marker="o", color="tab:green")
    for i, a in enumerate(accuracy):
        acc.annotate(f"{a:.2f}", (i, a), textcoords="offset points", xytext=(0, 6),
                     ha="center", fontsize="x-small")
    acc.set_xticks(range(len(stages)), names)
    acc.set(title="Validation accuracy after each stage", ylabel="validation accuracy (%)")
    acc.margins(y=0.15)  # room for the value labels
    from matplotlib.ticker import NullFormatter

    sizes = [number(s.get("dcz_bytes")) or 0.0 for s in stages]
    dense = number(report.get("dense_bytes"))
    bars = size.bar(range(len(stages)), [b / 1e3 for b in sizes], color="tab:purple")
    if dense:  # the rate against dense float32 says more than the bytes alone
        size.bar_label(bars, [f"{dense / b:.1f}x" if b else "" for b in sizes],
                       fontsize="x-small", padding=1)
    size.set_xticks(range(len(stages)), names)
    size.set_yscale("log")
    size.yaxis.set_minor_formatter(NullFormatter())  # decades only: readable, and quicker
    size.set(title=".dcz file size after each stage (label: rate vs dense float32)",
             ylabel="file size (kB, log scale)")
    for ax in (acc, size):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize="small", labelrotation=20)
    return save(fig, path)


def _dcz_state(path: Path | None) -> dict[str, np.ndarray]:
    if path is None:
        return {}
    from compression.dcz import load_dcz

    return {k: np.asarray(v) for k, v in load_dcz(path).model.state_dict().items()}


def _kept(state: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """Flat indices the .dcz kept for ``name`` (all without a mask); None if absent."""
    if name not in state:
        return None
    mask = state.get(name + "_mask")
    return np.arange(state[name].size) if mask is None else np.flatnonzero(mask.ravel() != 0)


def _codebooks(report: dict[str, Any] | None, state: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
    """Shared values per layer: the report's codebooks, else the distinct kept values of
    each weight in the .dcz (a shared or linearly quantized layer has few)."""
    books = (report or {}).get("codebooks") or {}
    if books:
        return {n: np.asarray(v, dtype=np.float64) for n, v in books.items() if len(v)}
    out = {}
    for name, w in state.items():
        kept = _kept(state, name)
        if w.ndim >= 2 and not name.endswith("_mask") and kept is not None:
            values = np.unique(w.ravel()[kept])
            if 1 < values.size <= MAX_SHARED:
                out[name] = values.astype(np.float64)
    return out


def _checkpoint_weights(checkpoints: list[Path], name: str, shape: tuple[int, ...] | None,
                        kept: np.ndarray | None) -> tuple[np.ndarray, Path] | None:
    """``name`` from the dense checkpoint that the compression most likely started from.

    A run directory can hold several (local, sync, async); magnitude pruning kept the
    largest weights of the one it pruned, so the candidate whose largest weights
    coincide best with the kept positions is taken (the first one without a .dcz).
    """
    best: tuple[float, np.ndarray, Path] | None = None
    for path in checkpoints:
        try:
            with np.load(path, allow_pickle=False) as z:
                key = f"model/{name}"
                if key not in z.files or (shape is not None and tuple(z[key].shape) != shape):
                    continue
                w = np.asarray(z[key])
        except (OSError, ValueError):  # not a distnet checkpoint
            continue
        score = 0.0
        if kept is not None and 0 < kept.size < w.size:
            top = np.argpartition(-np.abs(w.ravel()), kept.size - 1)[: kept.size]
            score = np.intersect1d(top, kept, assume_unique=True).size / kept.size
        if best is None or score > best[0]:
            best = (score, w, path)
    return None if best is None else (best[1], best[2])


def weights_figure(report: dict[str, Any] | None, model: Path | None,
                   checkpoints: list[Path], root: Path, path: Path) -> Path:
    """Weight histogram of the shared layers with their shared values (centroids) marked."""
    try:
        state = _dcz_state(model)
    except (OSError, ValueError) as exc:  # DczError is a ValueError: a damaged file
        raise NoData(f"cannot read {model}: {exc}") from None
    books = _codebooks(report, state)
    if not books:
        raise NoData("no shared layers (no codebooks in the report, no shared .dcz weights)")
    if len(books) > MAX_HIST_LAYERS:  # the largest layers, kept in model order
        largest = sorted(books, key=lambda n: -(state[n].size if n in state else len(books[n])))
        books = {n: books[n] for n in books if n in largest[:MAX_HIST_LAYERS]}
    panels = []
    for name, centroids in books.items():
        shape = tuple(state[name].shape) if name in state else None
        kept = _kept(state, name)
        after = state[name].ravel()[kept] if kept is not None else None  # the .dcz's values
        dense = _checkpoint_weights(checkpoints, name, shape, kept)
        before, source = None, None
        if dense is not None:
            before = dense[0].ravel()[kept] if kept is not None else dense[0].ravel()
            source = dense[1].relative_to(root)
        if (before is not None and before.size) or (after is not None and after.size):
            panels.append((name, centroids, before, source, after))
    if not panels:
        raise NoData("the report has codebooks but not the weights: keep the .dcz or the "
                     "trained .npz in the run directory")
    fig, axes = new_figure(len(panels), 1, 9.5, 3.2 * len(panels))
    for k, (ax, (name, centroids, before, source, after)) in enumerate(
            zip(axes, panels, strict=True)):
        twin = ax
        if before is not None:
            where = "at the kept positions" if after is not None else "(all)"
            # one filled outline, not 200 bar patches: the same picture, drawn faster
            ax.hist(before, bins=min(200, max(20, before.size // 20)), color="0.6",
                    histtype="stepfilled", label=f"trained weights {where}: {source}")
            ax.set_ylabel("weights per bin")
        for i, c in enumerate(centroids):
            ax.axvline(float(c), color="tab:red", lw=0.8, alpha=0.6,
                       label=f"shared values ({centroids.size})" if i == 0 else None)
        if after is not None:
            # every stored weight equals a shared value: how many use each (after
            # retraining and centroid fine-tuning), the distribution actually coded
            uniq, counts = np.unique(after, return_counts=True)
            twin = ax.twinx() if before is not None else ax
            label = f"weights per shared value in {model.relative_to(root) if model else '.dcz'}"
            if before is not None:
                twin.plot(uniq, counts, "o", color="tab:red", ms=4, label=label + " (right axis)")
            else:
                twin.vlines(uniq, 0, counts, color="0.3", lw=2, label=label)
            twin.set_ylabel("weights per shared value")
            twin.set_ylim(bottom=0)
        count = after.size if after is not None else before.size
        title = f"{name}: {count:,} kept weights, {centroids.size} shared values"
        if after is not None and np.unique(after).size < centroids.size:
            # k-means can leave centroids without weights; the file drops them
            title += f" ({np.unique(after).size} in use)"
        ax.set(title=title, xlabel="weight value")
        if k == 0:  # the same entries in every panel: one legend is enough
            handles, labels = ax.get_legend_handles_labels()
            if twin is not ax:
                more = twin.get_legend_handles_labels()
                handles, labels = handles + more[0], labels + more[1]
            twin.legend(handles, labels, fontsize="x-small", loc="upper left")
    fig.suptitle("Weight distribution and shared values (k-means centroids, red)")
    return save(fig, path)


def sensitivity_figure(scan: dict[str, Any], path: Path) -> Path:
    """Accuracy with one layer pruned at a time against its sparsity (Han et al. 2015)."""
    curves = {n: c for n, c in scan["layers"].items() if isinstance(c, list) and c}
    if not curves:
        raise NoData("the sensitivity scan has no layers")
    proposal = scan.get("proposal") or {}
    fig, (ax,) = new_figure(1, 1, 8, 4.6)
    for i, (name, curve) in enumerate(curves.items()):
        pts = sorted((100 * float(s), 100 * float(v)) for s, v in curve)
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=f"C{i % 10}", label=name)
        chosen = number(proposal.get(name))
        if chosen:  # the proposed sparsity, on the curve
            ys = [v for s, v in pts if abs(s - 100 * chosen) < 1e-6]
            if ys:
                ax.plot([100 * chosen], ys[:1], marker="*", ms=12, color=f"C{i % 10}")
    ax.axhline(100 * float(scan["baseline"]), color="0.3", ls="--", lw=1, label="unpruned")
    ax.set(title="Pruning sensitivity: one layer pruned at a time (star: proposed)",
           xlabel="sparsity of the layer (%)", ylabel="validation accuracy (%)")
    ax.grid(alpha=0.3)
    legend(ax, loc="lower left")
    return save(fig, path)
