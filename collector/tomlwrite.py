"""A minimal TOML writer for the config tree (tables of scalars, lists and nested tables)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def dumps(data: Mapping[str, Any], _prefix: str = "") -> str:
    """Serialise ``data``; None values are left out (TOML has no null)."""
    lines = []
    tables = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_value(value)}")
    out = "\n".join(lines)
    for key, table in tables:
        name = f"{_prefix}.{key}" if _prefix else key
        body = dumps(table, name)
        has_scalars = any(v is not None and not isinstance(v, Mapping) for v in table.values())
        header = f"[{name}]\n" if has_scalars or not table else ""
        out += ("\n\n" if out else "") + header + body
    return out.strip("\n") + ("\n" if not _prefix else "")
