"""Training figures: loss, validation accuracy, staleness, bytes on the wire, latency.

Each ``*_figure(run, path)`` draws one PNG from ``RunData`` and returns its path, or
raises ``NoData`` when the run recorded nothing it could show.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from distnet.plots.runs import RunData, Series, number
from distnet.plots.style import (
    HATCHES,
    NoData,
    byte_unit,
    grouped_bars,
    legend,
    new_figure,
    save,
)

STALE_MODES = ("async", "ssp")  # sync (and local) staleness is 0 by construction
WALL = "wall time since the first record of each run (s)"
# What each latency key of distnet.dist.updates / allreduce measures.
LATENCIES = {
    "push_pull_ms": "push + pull round trip (sync)",
    "push_ms": "push: sent to applied (async)",
    "push_wait_ms": "wait for the push reply",
    "pull_wait_ms": "wait for the overlapped pull",
    "clock_wait_ms": "wait at the SSP clock",
    "pull_ms": "pull (SSP, cache too stale)",
    "allreduce_ms": "Allreduce",
}


def _points(s: Series, rows: list[dict[str, Any]], key: str,
            x_of: Any) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = x_of(r), number(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _step(r: dict[str, Any]) -> float | None:
    return number(r.get("step"))


def _wall(s: Series) -> Any:
    def x(r: dict[str, Any]) -> float | None:
        t = number(r.get("time"))
        return None if t is None else t - s.t0
    return x


def loss_figure(run: RunData, path: Path) -> Path:
    """Training loss (of the logged batches) against step and against wall time."""
    series = [s for s in run.series if any(number(r.get("loss")) is not None for r in s.steps)]
    if not series:
        raise NoData("no step losses in the metrics")
    fig, (by_step, by_time) = new_figure(1, 2, 12, 4.2)
    for s in series:
        by_step.plot(*_points(s, s.steps, "loss", _step), **s.style())
        by_time.plot(*_points(s, s.steps, "loss", _wall(s)), **s.style())
    by_step.set(title="Training loss against step", xlabel="step (global batches)",
                ylabel="batch loss")
    by_time.set(title="Training loss against wall time", xlabel=WALL, ylabel="batch loss")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        legend(ax)
    return save(fig, path)


def _epoch_end_steps(s: Series) -> dict[int, float]:
    """Steps done at the end of each epoch: epoch records carry no step, so take the
    last logged step of the epoch (fit always logs an epoch's last step) plus one."""
    ends: dict[int, float] = {}
    for r in s.steps:
        epoch, step = number(r.get("epoch")), number(r.get("step"))
        if epoch is not None and step is not None:
            ends[int(epoch)] = max(ends.get(int(epoch), 0.0), step + 1)
    return ends


def accuracy_figure(run: RunData, path: Path) -> Path:
    """Validation accuracy (each epoch's end) against step and against wall time."""
    series = [s for s in run.series
              if any(number(r.get("val_accuracy")) is not None for r in s.epochs)]
    if not series:
        raise NoData("no validation accuracy in the metrics")
    fig, (by_step, by_time) = new_figure(1, 2, 12, 4.2)
    for s in series:
        ends = _epoch_end_steps(s)
        rows = [dict(r, val_pct=100 * r["val_accuracy"]) for r in s.epochs
                if number(r.get("val_accuracy")) is not None]
        by_step.plot(*_points(s, rows, "val_pct", lambda r, e=ends: e.get(int(r["epoch"]))),
                     marker="o", **s.style())
        by_time.plot(*_points(s, rows, "val_pct", _wall(s)), marker="o", **s.style())
    by_step.set(title="Validation accuracy against step", xlabel="step (global batches)",
                ylabel="validation accuracy (%)")
    by_time.set(title="Validation accuracy against wall time", xlabel=WALL,
                ylabel="validation accuracy (%)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        legend(ax, loc="lower right")
    return save(fig, path)


def _stale(s: Series) -> bool:
    return s.mode in STALE_MODES


def _percent_bars(ax: Any, hists: dict[str, Counter[int]],
                  styles: dict[str, tuple[str, str]]) -> None:
    """Grouped bars: the share of each staleness value, per histogram."""
    seen = {k for h in hists.values() for k in h}
    values = list(range(min(seen), max(seen) + 1))  # every value: gaps show as gaps
    groups = {}
    for name, h in hists.items():
        total = sum(h.values()) or 1
        groups[name] = [100.0 * h.get(v, 0) / total for v in values]
    grouped_bars(ax, [str(v) for v in values], groups, [styles[n][0] for n in hists],
                 hatches=[HATCHES.get(styles[n][1]) for n in hists])


def staleness_figure(run: RunData, path: Path) -> Path:
    """Staleness histograms of async/SSP runs: of every update, as the servers counted it,
    and of what each worker saw (the largest per logged interval)."""
    servers: dict[str, Counter[int]] = {}
    styles: dict[str, tuple[str, str]] = {}  # name -> (colour, line style)
    for s in run.series:
        for row in s.servers:
            hist = row.get("staleness_hist")
            if isinstance(hist, dict) and (_stale(s) or any(str(k) != "0" for k in hist)):
                # with K shards every push is counted K times: the shares are unchanged
                c = servers.setdefault(s.group_label, Counter())
                c.update({int(k): int(v) for k, v in hist.items()})
                styles[s.group_label] = (s.color, "-")
    workers: dict[str, Counter[int]] = {}
    for s in run.series:
        seen = [int(v) for r in s.steps if (v := number(r.get("staleness"))) is not None]
        if seen and (_stale(s) or any(seen)):
            workers[s.label] = Counter(seen)
            styles[s.label] = (s.color, s.linestyle)
    # the legend says how many updates each server histogram counts
    for name in list(servers):
        counted = f"{name} ({sum(servers[name].values()):,} updates)"
        servers[counted], styles[counted] = servers.pop(name), styles[name]
    if not servers and not workers:
        raise NoData("no staleness recorded (async or ssp runs have it)")
    panels = [p for p in (servers, workers) if p]
    fig, axes = new_figure(1, len(panels), 6.5 * len(panels), 4.2)
    for ax, hists in zip(axes, panels, strict=True):
        _percent_bars(ax, hists, styles)
        if hists is servers:
            ax.set(title="Staleness of each update at the server",
                   xlabel="staleness (versions the server moved on before applying)",
                   ylabel="updates (%)")
        else:
            ax.set(title="Largest staleness a worker saw per logged interval",
                   xlabel="staleness (versions, or clocks ahead for SSP)",
                   ylabel="logged intervals (%)")
        ax.grid(axis="y", alpha=0.3)
        legend(ax)
    return save(fig, path)


def bytes_figure(run: RunData, path: Path) -> Path:
    """Bytes each worker sent and received per step, and the mean per mode/codec."""
    series = [s for s in run.series
              if any(number(r.get("bytes_sent")) is not None for r in s.steps)]
    if not series:
        raise NoData("no bytes recorded (distributed runs have them)")
    every = [v for s in series for r in s.steps
             for v in (number(r.get("bytes_sent")), number(r.get("bytes_received")))
             if v is not None]
    scale, unit = byte_unit(every)
    fig, (sent, received, means) = new_figure(1, 3, 16, 4.2)
    totals: dict[str, list[list[float]]] = {}
    for s in series:
        for ax, key in ((sent, "bytes_sent"), (received, "bytes_received")):
            xs, ys = _points(s, s.steps, key, _step)
            ax.plot(xs, [y / scale for y in ys], **s.style())
            totals.setdefault(s.group_label, [[], []])[key == "bytes_received"].extend(ys)
    sent.set(title="Sent per step, by worker", ylabel=f"{unit} per step")
    received.set(title="Received per step, by worker", ylabel=f"{unit} per step")
    top = max(every, default=0.0) / scale
    for ax in (sent, received):
        ax.set_xlabel("step (global batches)")
        # from 0, with room above: a constant rate would otherwise hide in the frame
        ax.set_ylim(0, 1.25 * top or 1.0)
        ax.grid(alpha=0.3)
        legend(ax)
    names = list(totals)
    mean = [[sum(v) / len(v) / scale if v else 0.0 for v in totals[n]] for n in names]
    grouped_bars(means, names, {"sent": [m[0] for m in mean], "received": [m[1] for m in mean]},
                 ["0.3", "0.7"], value_format="%.3g")  # grey: mode colours mean modes
    means.set(title="Mean per step and worker, by mode/codec", ylabel=f"{unit} per step",
              ylim=(0, 1.25 * top or 1.0))
    means.grid(axis="y", alpha=0.3)
    legend(means)
    return save(fig, path)


def latency_figure(run: RunData, path: Path) -> Path:
    """Push/pull/clock/Allreduce times per step, one panel per kind, one line per worker."""
    keys = [k for k in LATENCIES
            if any(number(r.get(k)) is not None for s in run.series for r in s.steps)]
    keys += sorted({k for s in run.series for r in s.steps for k in r
                    if k.endswith("_ms") and k not in LATENCIES})
    if not keys:
        raise NoData("no push/pull latencies recorded (distributed runs have them)")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = new_figure(rows, cols, 5.3 * cols, 3.8 * rows)
    for ax, key in zip(axes, keys, strict=False):
        for s in run.series:
            xs, ys = _points(s, s.steps, key, _step)
            if xs:
                ax.plot(xs, ys, **s.style())
        ax.set(title=LATENCIES.get(key, key), xlabel="step (global batches)",
               ylabel="ms per step (interval mean)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        legend(ax)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return save(fig, path)


FIGURES = {
    "loss.png": loss_figure,
    "accuracy.png": accuracy_figure,
    "staleness.png": staleness_figure,
    "bytes.png": bytes_figure,
    "latency.png": latency_figure,
}
