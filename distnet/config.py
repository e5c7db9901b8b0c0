"""Run settings as TOML: writing the resolved config (reading is tomllib's job)."""

from __future__ import annotations

import json
from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string has JSON's escapes


def to_toml(config: dict[str, Any]) -> str:
    """Flat settings (and one level of tables) as TOML; None values are left out."""
    lines, tables = [], []
    for key in sorted(config):
        value = config[key]
        if value is None or key.startswith("_"):
            continue
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_value(v)}" for k, v in sorted(table.items()) if v is not None)
    return "\n".join(lines) + "\n"
