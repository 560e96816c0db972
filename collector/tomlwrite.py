"""A minimal TOML writer for the config tree: tables, arrays of tables, scalars and lists of scalars."""

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


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _scalars(table: Mapping[str, Any]) -> list[str]:
    """``key = value`` lines of a table's own values; None is left out (TOML has no null)."""
    return [
        f"{key} = {_value(value)}"
        for key, value in table.items()
        if value is not None and not isinstance(value, Mapping) and not _is_table_array(value)
    ]


def _blocks(table: Mapping[str, Any], prefix: str) -> list[str]:
    blocks = []
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            own = _scalars(value)
            if own or not value:
                blocks.append("\n".join([f"[{name}]", *own]))
            blocks.extend(_blocks(value, name))
        elif _is_table_array(value):
            for item in value:
                blocks.append("\n".join([f"[[{name}]]", *_scalars(item)]))
                blocks.extend(_blocks(item, name))
    return blocks


def dumps(data: Mapping[str, Any]) -> str:
    """Serialise ``data`` as TOML, ending with a newline."""
    parts = ["\n".join(_scalars(data))] if _scalars(data) else []
    parts.extend(_blocks(data, ""))
    return "\n\n".join(parts) + "\n"
