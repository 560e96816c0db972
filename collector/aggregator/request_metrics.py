"""Energy-per-request metrics on the aggregator's /metrics, fed by the request engine; thread-safe, rendered fresh at
each scrape (a provider of ``AggregatorMetrics``).

A request counts once, when it first becomes final or approximate (a later revision of its energy changes the
stored result, not these counters, and counts in ``wattmeter_request_revisions_total``). ``no_samples`` requests
have no energy: they count in ``wattmeter_requests_no_samples_total`` only. Counters start from 0 when the
aggregator starts (Prometheus' ``rate`` and ``increase`` handle the reset).

Label cardinality is bounded: the first ``max_label_values`` distinct models, and as many tenants, get their own
label value; later ones are counted under ``"other"``. An empty model or tenant is ``""``.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from collector.exporters.exposition import Family

# 1 J to 100 kJ: a short chat completion on one GPU is tens of J, a long agentic one on 8 GPUs tens of kJ
ENERGY_BUCKETS_J = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5)
_BOUNDS = np.array(ENERGY_BUCKETS_J)
VIEWS = ("active", "full")
OTHER = "other"


class LabelCap:
    """The first ``limit`` distinct values pass; the rest become ``OTHER``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(ENERGY_BUCKETS_J) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(ENERGY_BUCKETS_J, value)] += 1
        self.sum += value

    def observe_many(self, values: npt.NDArray[np.float64]) -> None:
        """``observe`` of each of ``values``: the same buckets (searchsorted left is bisect_left)."""
        buckets = np.bincount(np.searchsorted(_BOUNDS, values, side="left"), minlength=len(self.counts))
        for i, count in enumerate(buckets.tolist()):
            self.counts[i] += count
        self.sum += math.fsum(values.tolist())

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, ENERGY_BUCKETS_J), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class RequestMetrics:
    def __init__(self, max_label_values: int = 100) -> None:
        self._lock = threading.Lock()
        self._model = LabelCap(max_label_values)
        self._tenant = LabelCap(max_label_values)
        self._energy: dict[tuple[str, str], _Histogram] = {}  # (model, view)
        self._energy_total: dict[tuple[str, str], float] = {}  # (model, tenant) -> active J
        self._requests: Counter[tuple[str, str]] = Counter()
        self._output_tokens: dict[str, int] = {}
        self._no_samples = 0
        self._revisions = 0
        self._pending = 0
        self._pass_errors = 0

    def finished(
        self, model: str, tenant: str, active_j: float | None, full_j: float | None, output_tokens: int
    ) -> None:
        """A request that became final or approximate for the first time (energies None: ``no_samples``)."""
        with self._lock:
            if active_j is None or full_j is None:
                self._no_samples += 1
                return
            model = self._model(model)
            key = (model, self._tenant(tenant))
            for view, joules in (("active", active_j), ("full", full_j)):
                histogram = self._energy.get((model, view))
                if histogram is None:
                    histogram = self._energy[(model, view)] = _Histogram()
                histogram.observe(joules)
            self._energy_total[key] = self._energy_total.get(key, 0.0) + active_j
            self._requests[key] += 1
            self._output_tokens[model] = self._output_tokens.get(model, 0) + output_tokens

    def finished_many(
        self,
        model: Sequence[str],
        tenant: Sequence[str],
        active_j: npt.NDArray[np.float64],
        full_j: npt.NDArray[np.float64],
        output_tokens: npt.NDArray[np.int64],
    ) -> None:
        """``finished`` of many requests at once, as columns (energies NaN: ``no_samples``), one pass per
        (model, tenant) group, in the order of first appearance (label caps see values in the same order)."""
        known = np.flatnonzero(~np.isnan(active_j))
        with self._lock:
            self._no_samples += len(model) - known.size
            if not known.size:
                return
            rows = known.tolist()
            pairs: dict[tuple[str, str], int] = {}
            if len(set(model)) == 1 and len(set(tenant)) == 1:  # the usual case: no tuple per request
                pairs[(model[rows[0]], tenant[rows[0]])] = 0
                code = np.zeros(len(rows), dtype=np.int64)
            else:
                code = np.array([pairs.setdefault((model[i], tenant[i]), len(pairs)) for i in rows], dtype=np.int64)
            order = np.argsort(code, kind="stable")
            bounds = np.searchsorted(code[order], np.arange(len(pairs) + 1))
            for (m, t), c in pairs.items():
                chosen = known[order[bounds[c] : bounds[c + 1]]]
                key = (self._model(m), self._tenant(t))
                for view, joules in (("active", active_j[chosen]), ("full", full_j[chosen])):
                    histogram = self._energy.get((key[0], view))
                    if histogram is None:
                        histogram = self._energy[(key[0], view)] = _Histogram()
                    histogram.observe_many(joules)
                self._energy_total[key] = self._energy_total.get(key, 0.0) + math.fsum(active_j[chosen].tolist())
                self._requests[key] += chosen.size
                self._output_tokens[key[0]] = self._output_tokens.get(key[0], 0) + int(output_tokens[chosen].sum())

    def revised(self, count: int) -> None:
        with self._lock:
            self._revisions += count

    def set_pending(self, count: int) -> None:
        with self._lock:
            self._pending = count

    def pass_failed(self) -> None:
        with self._lock:
            self._pass_errors += 1

    def families(self) -> list[Family]:
        with self._lock:
            energy = Family(
                "wattmeter_request_energy_joules",
                "histogram",
                "Energy per request (J) when it is first final or approximate, by model and view: active (the "
                "workload's measured energy while it ran) or full (plus its idle share, times the PUE).",
                ("model", "view"),
            )
            for (model, view), histogram in sorted(self._energy.items()):
                energy.add_histogram((model, view), histogram.cumulative(), histogram.sum)
            energy_total = Family(
                "wattmeter_request_energy_joules",
                "counter",
                "Active energy of finished requests (J), by model and tenant.",
                ("model", "tenant"),
            )
            requests = Family(
                "wattmeter_requests",
                "counter",
                "Requests finished with an energy, by model and tenant.",
                ("model", "tenant"),
            )
            for key in sorted(self._requests):
                energy_total.add(key, self._energy_total[key])
                requests.add(key, float(self._requests[key]))
            tokens = Family(
                "wattmeter_output_tokens",
                "counter",
                "Output tokens of finished requests, by model (J per token: divide the energy counter by this).",
                ("model",),
            )
            for model in sorted(self._output_tokens):
                tokens.add((model,), float(self._output_tokens[model]))
            no_samples = Family(
                "wattmeter_requests_no_samples",
                "counter",
                "Requests whose hosts sent no samples for their time by the end of the grace period (no energy).",
                (),
            )
            no_samples.add((), float(self._no_samples))
            revisions = Family(
                "wattmeter_request_revisions",
                "counter",
                "Stored results rewritten because a late span or late samples changed them.",
                (),
            )
            revisions.add((), float(self._revisions))
            pending = Family(
                "wattmeter_requests_pending",
                "gauge",
                "Requests waiting for samples (at the last pass; a lower bound when the pass was full).",
                (),
            )
            pending.add((), float(self._pending))
            errors = Family(
                "wattmeter_request_engine_errors",
                "counter",
                "Attribution passes, or parts of one, that failed (logged; retried at the next pass).",
                (),
            )
            errors.add((), float(self._pass_errors))
        return [energy, energy_total, requests, tokens, no_samples, revisions, pending, errors]
