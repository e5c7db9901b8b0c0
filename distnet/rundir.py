"""Run directories: ``runs/<name>/`` keeps a run's settings, metrics, checkpoints and reports.

    runs/<name>/config.toml     the resolved settings
    runs/<name>/metrics.jsonl   one JSON object per step/epoch (per rank: metrics.rank<k>.jsonl)
    runs/<name>/model.npz       the final checkpoint
    runs/<name>/*.json, *.png   reports and plots
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from distnet.config import to_toml


def runs_root() -> Path:
    """Where run directories go: ``$DISTNET_RUNS`` or ``./runs``."""
    return Path(os.environ.get("DISTNET_RUNS", "runs"))


def default_name(*parts: Any) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return "-".join(str(p) for p in parts if p) + f"-{stamp}-{os.getpid() % 10000:04d}"


def create_run_dir(config: dict[str, Any], *parts: Any) -> Path:
    """Make the run directory named by ``config['run_dir']``/``config['name']`` and fill in
    default paths (metrics, checkpoint) inside it; writes ``config.toml``."""
    if config.get("run_dir"):
        path = Path(config["run_dir"])
    else:
        path = runs_root() / (config.get("name") or default_name(*parts))
    path.mkdir(parents=True, exist_ok=True)
    config["run_dir"] = str(path)
    if not config.get("metrics"):
        config["metrics"] = str(path / "metrics.jsonl")
    if not config.get("out"):
        config["out"] = str(path / "model.npz")
    (path / "config.toml").write_text(to_toml(config), encoding="utf-8")
    return path
