"""The compression report: per layer as in Deep Compression's tables, per stage, overall.

Per layer: weights, % kept (P), bits per kept weight for its value index after
sharing (fixed width, P+Q) and after Huffman (P+Q+H), bits per kept weight for its
position (relative index with fillers, fixed width, and after Huffman), bytes in
the file and the compression rate. Totals count the whole file: the header (model
spec, Huffman code lengths, meta; codebooks are counted with their layers) and every
tensor, biases and buffers included: the rows add up to the file size.
``ratio`` = dense float32 parameter bytes / .dcz file bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from distnet.nn.module import Module


def tensor_bytes(t: dict[str, Any]) -> int:
    """Bytes a tensor takes in the payload (its header entry is counted with the header)."""
    return int(t.get("gap_bytes", 0) + t.get("value_bytes", 0) + t.get("book_bytes", 0)
               + t.get("index_bytes", 0))


def layer_row(t: dict[str, Any]) -> dict[str, Any]:
    """One row of the per-layer table from a tensor's ``encode_model`` statistics."""
    kept = max(int(t["kept"]), 1)
    size = int(t["size"])
    row: dict[str, Any] = {"name": t["name"], "shape": t["shape"], "weights": size,
                           "kept_pct": 100.0 * t["kept"] / max(size, 1),
                           "encoding": t["encoding"], "bytes": tensor_bytes(t)}
    if t["encoding"] == "book":
        row.update(codebook=t["book_size"], index_coding=t["index_coding"],
                   weight_bits_pq=float(t["index_width"]),
                   weight_bits_pqh=t["index_nbits"] / kept)
    else:
        row.update(weight_bits_pq=8.0 * t["value_bytes"] / kept,
                   weight_bits_pqh=8.0 * t["value_bytes"] / kept)
    if t.get("gap_bits"):
        row.update(gap_bits=t["gap_bits"], index_bits_pq=t["gap_bits"] * t["gap_symbols"] / kept,
                   index_bits_pqh=8.0 * t["gap_bytes"] / kept)
    else:
        row.update(index_bits_pq=0.0, index_bits_pqh=0.0)
    fixed = (row["weight_bits_pq"] + row["index_bits_pq"]) * kept / 8 + t.get("book_bytes", 0)
    row["ratio_pq"] = 4.0 * size / max(fixed, 1e-9)
    row["ratio_pqh"] = 4.0 * size / max(row["bytes"], 1e-9)
    return row


def build_report(model: Module, stats: dict[str, Any], stages: list[dict[str, Any]],
                 dense_bytes: int, plan: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None,
                 codebooks: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The JSON-able report of a compression run."""
    rows = [layer_row(t) for t in stats["tensors"] if t["kind"] == "param"]
    buffers = sum(tensor_bytes(t) for t in stats["tensors"] if t["kind"] == "buffer")
    weights = [r for r in rows if len(r["shape"]) >= 2]
    n_weights = sum(r["weights"] for r in weights)
    kept = sum(r["weights"] * r["kept_pct"] / 100 for r in weights)
    base, final = stages[0], stages[-1]
    # Codebooks sit in the header but belong to their layers' rows: the header row gets
    # the rest, so the rows add up to the file size exactly.
    header = int(stats["file_bytes"]) - sum(r["bytes"] for r in rows) - buffers
    return {
        "dense_bytes": int(dense_bytes),
        "file_bytes": int(stats["file_bytes"]),
        "ratio": dense_bytes / stats["file_bytes"],
        "header_bytes": header,
        "buffer_bytes": int(buffers),
        "weights_kept_pct": 100.0 * kept / max(n_weights, 1),
        "accuracy": {"baseline": base["accuracy"], "final": final["accuracy"],
                     "drop_points": 100.0 * (base["accuracy"] - final["accuracy"])},
        "stages": stages,
        "layers": rows,
        "plan": {k: v for k, v in (plan or {}).items() if v is not None},
        **(extra or {}),
        "codebooks": {k: [float(x) for x in v] for k, v in (codebooks or {}).items()},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text: the layer table (Deep Compression style), stages and totals."""
    head = (f"{'layer':<12}{'shape':>14}{'weights':>9}{'kept':>7}{'w bits':>8}{'+Huff':>7}"
            f"{'idx bits':>9}{'+Huff':>7}{'bytes':>9}{'rate':>8}{'+Huff':>8}")
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(
            f"{r['name']:<12}{shape:>14}{r['weights']:>9,}{r['kept_pct']:>6.1f}%"
            f"{r['weight_bits_pq']:>8.2f}{r['weight_bits_pqh']:>7.2f}"
            f"{r['index_bits_pq']:>9.2f}{r['index_bits_pqh']:>7.2f}{r['bytes']:>9,}"
            f"{r['ratio_pq']:>7.1f}x{r['ratio_pqh']:>7.1f}x")
    lines.append("-" * len(head))
    lines.append(f"{'header':<12}{'(spec, code tables, meta)':>30}{report['header_bytes']:>39,}")
    if report["buffer_bytes"]:
        lines.append(f"{'buffers':<12}{report['buffer_bytes']:>69,}")
    lines.append(f"{'total':<12}{'kept':>23} {report['weights_kept_pct']:.1f}% of weights"
                 f"{report['file_bytes']:>23,}{report['ratio']:>15.1f}x")
    lines.append("")
    lines.append(f"{'stage':<16}{'accuracy':>9}{'loss':>9}{'params':>10}{'.dcz bytes':>12}"
                 f"{'ratio':>8}{'seconds':>9}")
    for s in report["stages"]:
        lines.append(f"{s['stage']:<16}{100 * s['accuracy']:>8.2f}%{s['loss']:>9.4f}"
                     f"{s['params']:>10,}{s['dcz_bytes']:>12,}"
                     f"{report['dense_bytes'] / s['dcz_bytes']:>7.1f}x{s['seconds']:>9.1f}")
    acc = report["accuracy"]
    lines.append("")
    lines.append(f"dense {report['dense_bytes']:,} B -> {report['file_bytes']:,} B: "
                 f"{report['ratio']:.1f}x smaller; accuracy {100 * acc['baseline']:.2f}% -> "
                 f"{100 * acc['final']:.2f}% ({-acc['drop_points']:+.2f} points)")
    return "\n".join(lines)


def save_report(report: dict[str, Any], path: str | Path) -> None:
    """Write the report as JSON."""
    Path(path).write_text(json.dumps(report, indent=1, default=_plain) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def plot_weights(values: np.ndarray, centroids: np.ndarray | None, path: str | Path,
                 title: str = "") -> bool:
    """Histogram of a layer's kept weights with its centroids marked; False (and no file)
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(np.asarray(values).ravel(), bins=200, color="0.4")
    if centroids is not None:
        for c in np.asarray(centroids).ravel():
            ax.axvline(float(c), color="tab:red", lw=0.8, alpha=0.8)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    ax.set_title(title or "weight distribution and shared values")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
