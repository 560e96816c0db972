"""Prometheus text exposition (format 0.0.4) with each series' name-and-labels prefix cached between renders.

``prometheus_client.generate_latest`` escapes and validates every label of every sample on every render, which
is most of a render's cost; the agent's label sets hardly change, so each is escaped once here. Values are
written with ``repr`` (Go's parser reads them), +Inf/-Inf/NaN as the format spells them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.core import Metric

# A bound on cached prefixes; past it the cache starts over (series churn, not steady state).
MAX_CACHED_SERIES = 20_000

_TYPES = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "summary": "summary",
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
    "unknown": "untyped",
}


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def format_value(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    return repr(float(value))


class TextRenderer:
    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}

    def _prefix(self, name: str, labels: dict[str, str]) -> str:
        key = (name, tuple(labels.items()))
        prefix = self._prefixes.get(key)
        if prefix is None:
            if len(self._prefixes) >= MAX_CACHED_SERIES:
                self._prefixes.clear()
            if labels:
                inner = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sorted(labels.items()))
                prefix = f"{name}{{{inner}}} "
            else:
                prefix = f"{name} "
            self._prefixes[key] = prefix
        return prefix

    def render(self, families: Iterable[Metric]) -> bytes:
        out: list[str] = []
        append = out.append
        for metric in families:
            name = metric.name + "_total" if metric.type == "counter" else metric.name
            if metric.type == "info":
                name += "_info"
            doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            append(f"# HELP {name} {doc}\n# TYPE {name} {_TYPES.get(metric.type, 'untyped')}\n")
            for sample in metric.samples:
                append(self._prefix(sample.name, sample.labels))
                append(format_value(sample.value))
                append("\n")
        return "".join(out).encode()
