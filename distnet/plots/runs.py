"""What a run directory recorded, read for plotting: metrics series, reports, models.

Every ``*.jsonl`` file below the run directory whose records have a ``kind``
(``step``, ``epoch``, ``server``: see ``distnet.train.fit`` and
``distnet.dist.server_role.serve``) is one ``Series``: one per mode subdirectory
and per rank. JSON files are recognised by shape: a compression report
(``compression.report.build_report``: ``layers`` and ``stages`` lists) or a pruning
sensitivity scan (``compression.sensitivity``: ``baseline`` and a ``layers`` map).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Modes in the order the main job runs them: legends and colours follow it.
MODE_ORDER = ("local", "sync", "async", "ssp", "allreduce")
MAX_JSON_BYTES = 50 << 20  # larger JSON files are data, not reports: not worth parsing


@dataclass
class Series:
    """The records of one metrics file (its last run, when runs were appended to it)."""

    path: Path
    group: str  # the file's directory relative to the run directory ("." at the top)
    mode: str
    worker: int | None
    codec: str | None
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    servers: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""  # legend entry: "async worker 1"
    group_label: str = ""  # legend entry of its whole group: "async", "async fp16"
    t0: float = 0.0  # the group's first record: wall time is measured from here
    color: str = "C0"  # one colour per group (mode), one line style per worker
    linestyle: str = "-"
    order: tuple[int, int] = (0, 0)  # (group, worker): legend order

    def style(self) -> dict[str, Any]:
        return {"color": self.color, "linestyle": self.linestyle, "label": self.label}


@dataclass
class RunData:
    """Everything plottable found under ``root``."""

    root: Path
    series: list[Series]
    reports: list[tuple[Path, dict[str, Any]]]  # compression reports
    scans: list[tuple[Path, dict[str, Any]]]  # pruning sensitivity scans
    models: list[Path]  # .dcz files
    checkpoints: list[Path]  # .npz files (dense weights for the histogram)

    @property
    def empty(self) -> bool:
        return not (self.series or self.reports or self.scans or self.models)


def number(value: Any) -> float | None:
    """A finite float, or None: metrics keep NaN/Inf as strings (JSON has neither)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _files(root: Path, pattern: str) -> list[Path]:
    """Files below ``root`` matching ``pattern``, skipping hidden directories (.git, .venv)."""
    return sorted(p for p in root.rglob(pattern) if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1]))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a rank killed mid-write leaves a partial last line
                continue
            if isinstance(row, dict) and row.get("kind") in ("step", "epoch", "server"):
                rows.append(row)
    return rows


def _last_run(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the last run in a file: MetricsWriter appends, so a rerun into the
    same directory starts again at a lower step (a resumed run continues upwards)."""
    start, last = 0, None
    for i, row in enumerate(rows):
        step = number(row.get("step")) if row.get("kind") == "step" else None
        if step is not None:
            if last is not None and step < last:
                start = i
            last = step
    return rows[start:]


def _codec(directory: Path) -> str | None:
    """The gradient codec of the run in ``directory`` (its config.toml), None if unknown."""
    path = directory / "config.toml"
    if not path.is_file():
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        codec = tomllib.loads(path.read_text(encoding="utf-8")).get("codec")
    except (OSError, ValueError):
        return None
    return str(codec) if codec else None


def load_series(path: Path, root: Path) -> Series | None:
    """One metrics file as a Series; None when it holds no metrics records."""
    rows = _last_run(_read_rows(path))
    if not rows:
        return None
    group = str(path.parent.relative_to(root)) if path.parent != root else "."
    mode = next((str(r["mode"]) for r in rows if r.get("mode")), None)
    worker = next((int(r["worker"]) for r in rows if number(r.get("worker")) is not None), None)
    s = Series(path=path, group=group, mode=mode or path.parent.name, worker=worker,
               codec=_codec(path.parent))
    s.steps = [r for r in rows if r["kind"] == "step" and number(r.get("step")) is not None]
    s.epochs = [r for r in rows if r["kind"] == "epoch"]
    s.servers = [r for r in rows if r["kind"] == "server"][-1:]  # one final row per run
    return s


def _label(series: list[Series]) -> None:
    """Legend labels, colours and line styles: a colour per group, a style per worker."""
    def order(g: str) -> tuple[int, str]:
        mode = groups[g][0].mode
        return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), g)

    groups: dict[str, list[Series]] = {}
    for s in series:
        groups.setdefault(s.group, []).append(s)
    names = sorted(groups, key=order)
    base = {}
    for g in names:
        first = groups[g][0]
        codec = first.codec if first.codec and first.codec != "none" else None
        base[g] = f"{first.mode} {codec}" if codec else first.mode
    styles = ("-", "--", ":", "-.")
    for i, g in enumerate(names):
        members = groups[g]
        # two runs of the same mode (say, two async runs) are told apart by directory
        same = sum(1 for h in names if base[h] == base[g]) > 1
        group_label = f"{base[g]} ({g})" if same else base[g]
        t0 = min((number(r.get("time")) or math.inf for s in members
                  for r in s.steps + s.epochs + s.servers), default=0.0)
        trainers = sorted((s for s in members if s.steps or s.epochs),
                          key=lambda s: (s.worker is None, s.worker or 0, str(s.path)))
        for s in members:
            s.group_label, s.t0 = group_label, t0 if math.isfinite(t0) else 0.0
            s.color, s.label, s.order = f"C{i % 10}", group_label, (i, len(trainers))
        for j, s in enumerate(trainers):
            s.order = (i, j)
            if len(trainers) > 1:
                who = f"worker {s.worker}" if s.worker is not None else s.path.stem
                s.label, s.linestyle = f"{group_label} {who}", styles[j % len(styles)]


def _load_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_report(doc: Any) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("layers"), list)
            and isinstance(doc.get("stages"), list))


def is_scan(doc: Any) -> bool:
    return (isinstance(doc, dict) and number(doc.get("baseline")) is not None
            and isinstance(doc.get("layers"), dict))


def load_run(run_dir: str | Path) -> RunData:
    """Find and read everything plottable under ``run_dir``."""
    root = Path(run_dir)
    if not root.exists():
        raise FileNotFoundError(f"run directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    series = [s for p in _files(root, "*.jsonl") if (s := load_series(p, root)) is not None]
    _label(series)
    series.sort(key=lambda s: s.order)
    reports, scans = [], []
    for path in _files(root, "*.json"):
        doc = _load_json(path)
        if is_report(doc):
            reports.append((path, doc))
        elif is_scan(doc):
            scans.append((path, doc))
    return RunData(root=root, series=series, reports=reports, scans=scans,
                   models=_files(root, "*.dcz"), checkpoints=_files(root, "*.npz"))
