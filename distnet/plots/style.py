"""Figure plumbing shared by the plots: matplotlib on demand, Agg canvases, units.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas instead of
``pyplot``: no display is needed, no global backend is switched in the caller's
process (a notebook keeps its own), and no figure stays registered in pyplot's
list after it is saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

DPI = 110
INSTALL_HINT = "matplotlib is needed for plots: pip install 'distnet[plot]'"


class NoData(Exception):
    """The data a figure needs are absent: it is skipped, and the message says why."""


def require_matplotlib() -> None:
    """Raise ImportError with the install hint when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


def new_figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure on an Agg canvas and its axes, row by row."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def legend(ax: Any, **kwargs: Any) -> None:
    """A legend when the axes have labelled artists (an empty one only draws a box)."""
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize="small", **kwargs)


HATCHES = {"-": None, "--": "//", ":": "..", "-.": "xx"}  # bar hatch for each line style


def byte_unit(values: Sequence[float]) -> tuple[float, str]:
    """(divisor, unit) that keeps the largest of ``values`` between 1 and 1000."""
    top = max((abs(v) for v in values), default=0.0)
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if top >= scale:
            return scale, unit
    return 1.0, "B"


def grouped_bars(ax: Any, labels: Sequence[str], groups: dict[str, Sequence[float]],
                 colors: Sequence[str] | None = None, value_format: str | None = None,
                 hatches: Sequence[str | None] | None = None) -> None:
    """Bars for each x label, one bar per entry of ``groups`` side by side (``hatches``
    tell apart entries of one colour, such as the workers of one mode)."""
    n = max(len(groups), 1)
    width = 0.8 / n
    for k, (name, values) in enumerate(groups.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(labels))]
        color = colors[k % len(colors)] if colors else f"C{k % 10}"
        hatch = hatches[k % len(hatches)] if hatches else None
        bars = ax.bar(xs, values, width, label=name, color=color, hatch=hatch,
                      edgecolor="white" if hatch else None)
        if value_format:
            ax.bar_label(bars, fmt=value_format, fontsize="x-small", padding=1)
    ax.set_xticks(range(len(labels)), labels)
