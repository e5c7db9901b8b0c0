"""Metrics as JSON lines: one object per step or epoch, appended and flushed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the information readable
    return value


class MetricsWriter:
    """Appends ``{"time": ..., **record}`` lines to ``path`` (or does nothing when path is None)."""

    def __init__(self, path: str | Path | None, **common: Any) -> None:
        self.path = Path(path) if path else None
        self.common = common
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        if self._file is None:
            return
        row = {"time": round(time.time(), 6), **self.common, **record}
        self._file.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines metrics file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
