"""Figures of a run directory: training curves, staleness, bytes on the wire, compression.

``plot_run(run_dir, out=None)`` finds what a run recorded below its directory (every
metrics file: one per mode subdirectory and per rank; compression reports,
sensitivity scans, ``.dcz`` models, checkpoints), draws each figure whose data
exist as a PNG in the run directory (or ``out``) and returns the paths written:

    loss.png                 training loss against step and wall time, a line per worker/mode
    accuracy.png             validation accuracy against step and wall time
    staleness.png            staleness histograms (async, ssp): per update at the server,
                             and the largest per logged interval at each worker
    bytes.png                bytes sent/received per step, by worker and by mode/codec
    latency.png              push/pull/clock/Allreduce times per step
    compression_layers.png   per layer: % kept, bits per kept weight, compression rate
    compression_stages.png   accuracy and .dcz size after each compression stage
    compression_weights.png  weight histograms of shared layers, shared values marked
    sensitivity.png          accuracy against per-layer sparsity (a sensitivity scan)

With several compression reports (or scans) in one run, each figure name takes the
report's path as a suffix. matplotlib (the ``plot`` extra) is imported only when
drawing, so importing this package needs nothing beyond distnet.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from distnet.plots.runs import RunData, Series, load_run
from distnet.plots.style import NoData, require_matplotlib

__all__ = ["NoData", "RunData", "Series", "load_run", "plot_run"]

Draw = Callable[[Path], Path]


def _tag(path: Path, root: Path) -> str:
    """A file-name-safe suffix naming ``path`` within the run: ``compress-report``."""
    rel = path.relative_to(root).with_suffix("")
    return "-".join(rel.parts).replace(" ", "_")


def _compression_jobs(run: RunData) -> list[tuple[str, Draw]]:
    from distnet.plots.compressed import (
        layers_figure,
        sensitivity_figure,
        stages_figure,
        weights_figure,
    )

    # A report goes with the .dcz beside it (or the run's only .dcz); a .dcz without
    # a report still gives its weight histogram.
    sets: list[tuple[Path, dict[str, Any] | None, Path | None]] = []
    paired: set[Path] = set()
    for path, report in run.reports:
        beside = [m for m in run.models if m.parent == path.parent]
        model = beside[0] if beside else (run.models[0] if len(run.models) == 1 else None)
        if model is not None:
            paired.add(model)
        sets.append((path, report, model))
    sets += [(m, None, m) for m in run.models if m not in paired]
    jobs: list[tuple[str, Draw]] = []
    for path, report, model in sets:
        suffix = f"-{_tag(path, run.root)}" if len(sets) > 1 else ""
        if report is not None:
            jobs.append((f"compression_layers{suffix}.png", partial(layers_figure, report)))
            jobs.append((f"compression_stages{suffix}.png", partial(stages_figure, report)))
        # the checkpoints beside the report first: the likelier starting point
        ckpts = sorted(run.checkpoints, key=lambda p: (p.parent != path.parent, str(p)))
        jobs.append((f"compression_weights{suffix}.png",
                     partial(weights_figure, report, model, ckpts, run.root)))
    for path, scan in run.scans:
        suffix = f"-{_tag(path, run.root)}" if len(run.scans) > 1 else ""
        jobs.append((f"sensitivity{suffix}.png", partial(sensitivity_figure, scan)))
    return jobs


def plot_run(run_dir: str | Path, out: str | Path | None = None,
             log: Callable[[str], None] | None = None) -> list[Path]:
    """Draw every figure the run's data allow; returns the PNG paths written.

    ``log`` receives one line per figure skipped and why. Raises FileNotFoundError
    when ``run_dir`` is missing, ValueError when it holds nothing to plot, and
    ImportError (with the install hint) when matplotlib is not installed.
    """
    run = load_run(run_dir)
    if run.empty:
        raise ValueError(f"no metrics found under {run.root}: expected *.jsonl metrics from "
                         "distnet train (or a compression report / .dcz)")
    require_matplotlib()
    from distnet.plots.training import FIGURES

    target = Path(out) if out is not None else run.root
    target.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Draw]] = []
    if run.series:
        jobs += [(name, partial(draw, run)) for name, draw in FIGURES.items()]
    jobs += _compression_jobs(run)
    written, skipped = [], []
    for name, draw in jobs:
        try:
            written.append(draw(target / name))
        except NoData as exc:
            skipped.append(f"{name}: {exc}")
            if log is not None:
                log(f"skipped {name}: {exc}")
    if not written:
        raise ValueError(f"nothing to plot under {run.root} ({'; '.join(skipped)})")
    return written
