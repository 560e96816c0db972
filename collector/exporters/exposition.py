"""Metric families as plain rows, rendered to the Prometheus text format (0.0.4) or handed to prometheus_client.

A render builds ``Family`` rows from the sampler's state and writes them with each series' name-and-labels
prefix cached between renders: the agent's label sets hardly change, so each is escaped once, and a render costs
a value format per series. (``prometheus_client.generate_latest`` escapes and validates every label of every
sample on every render: about 1.8 ms for 8 GPUs against about 0.1 ms here.) Values are written with ``repr``,
which Go's parser reads; +Inf, -Inf and NaN as the format spells them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import Metric

# A bound on cached prefixes; past it the cache starts over (series churn, not steady state).
MAX_CACHED_SERIES = 20_000


@dataclass
class Family:
    """One metric family. ``name`` has no ``_total``: counters' samples get it, as in OpenMetrics.

    Each sample is (sample name, label names, label values, value); histogram buckets carry ``le`` last.
    """

    name: str
    type: str  # counter | gauge | histogram
    help: str
    labelnames: tuple[str, ...]
    samples: list[tuple[str, tuple[str, ...], tuple[str, ...], float]] = field(default_factory=list)

    def add(self, labelvalues: tuple[str, ...], value: float) -> None:
        sample_name = self.name + "_total" if self.type == "counter" else self.name
        self.samples.append((sample_name, self.labelnames, labelvalues, value))

    def add_histogram(self, labelvalues: tuple[str, ...], buckets: Iterable[tuple[str, int]], sum_value: float) -> None:
        bucket_names = (*self.labelnames, "le")
        count = 0
        for bound, count in buckets:
            self.samples.append((self.name + "_bucket", bucket_names, (*labelvalues, bound), float(count)))
        self.samples.append((self.name + "_count", self.labelnames, labelvalues, float(count)))
        self.samples.append((self.name + "_sum", self.labelnames, labelvalues, sum_value))


def to_metric(family: Family) -> Metric:
    """The same family as a prometheus_client ``Metric``, for a ``Collector`` and anything built on the registry."""
    metric = Metric(family.name, family.help, family.type)
    for sample_name, labelnames, labelvalues, value in family.samples:
        metric.add_sample(sample_name, dict(zip(labelnames, labelvalues, strict=True)), value)
    return metric


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def format_value(value: float) -> str:
    if value - value == 0:  # finite: inf - inf and nan - nan are nan
        return repr(value)
    if value != value:
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


class TextRenderer:
    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, tuple[str, ...]], str] = {}

    def _prefix(self, sample_name: str, labelnames: tuple[str, ...], labelvalues: tuple[str, ...]) -> str:
        if len(self._prefixes) >= MAX_CACHED_SERIES:
            self._prefixes.clear()
        if labelnames:
            pairs = sorted(zip(labelnames, labelvalues, strict=True))
            inner = ",".join(f'{name}="{_escape_label_value(value)}"' for name, value in pairs)
            prefix = f"{sample_name}{{{inner}}} "
        else:
            prefix = f"{sample_name} "
        self._prefixes[(sample_name, labelvalues)] = prefix
        return prefix

    def render(self, families: Iterable[Family]) -> bytes:
        out: list[str] = []
        append = out.append
        prefixes = self._prefixes
        for family in families:
            name = family.name + "_total" if family.type == "counter" else family.name
            doc = family.help.replace("\\", r"\\").replace("\n", r"\n")
            append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
            for sample_name, labelnames, labelvalues, value in family.samples:
                # the label names follow from the sample name within a family, so they need not be in the key
                prefix = prefixes.get((sample_name, labelvalues)) or self._prefix(sample_name, labelnames, labelvalues)
                append(prefix)
                append(format_value(value))
                append("\n")
        return "".join(out).encode()
