"""The request engine's memory of recent spans: what the store was just handed, kept as columns, so that a pass does
not read back the spans it needs (measured: reading and rebuilding them was most of the engine's 200 us a span).

The store hands every span write's new spans to ``SpanWindow.add`` once committed (``Store.add_span_listener``),
on the writer's thread; ``refresh``, on the engine's thread, takes them in. The store stays the source of truth:

- a host's spans are all here from its horizon on (``covers``): every span stored on it with ``end_ns`` at or past
  the horizon. At start the horizon is past the latest span the store held (``recover``: those came before this
  engine); dropping old spans (``WINDOW_NS`` behind the newest end, or beyond ``MAX_SPANS``) moves it on. Before
  the horizon (spans older than the window, spans stored before a restart), the engine reads the store;
- a pending request's spans come from here only when here are as many of them as the store counts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from collector.store.base import Int64Array, SpanColumns, SpanKey

S = 1_000_000_000
WINDOW_NS = 60 * S  # spans ending this long before the newest end seen are dropped (a pending request is younger)
MAX_SPANS = 400_000  # and never more than this many (about 300 bytes each)
NEVER = -(2**63)


def _ints(values: Sequence[int]) -> Int64Array:
    return np.array(values, dtype=np.int64) if len(values) else np.empty(0, np.int64)


@dataclass(frozen=True)
class SpanSet:
    """Spans as the engine uses them: text columns as lists, times and tokens as int64 arrays (no labels)."""

    request_id: list[str]
    span_id: list[str]
    hostname: list[str]
    workload: list[str]
    pid: list[int]
    service_name: list[str]
    model: list[str]
    tenant: list[str]
    start_ns: Int64Array
    end_ns: Int64Array
    queue_end_ns: Int64Array
    prefill_end_ns: Int64Array
    input_tokens: Int64Array
    output_tokens: Int64Array

    def __len__(self) -> int:
        return len(self.request_id)

    @classmethod
    def of(cls, spans: SpanColumns) -> SpanSet:
        return cls(
            spans.request_id,
            spans.span_id,
            spans.hostname,
            spans.workload,
            spans.pid,
            spans.service_name,
            spans.model,
            spans.tenant,
            _ints(spans.start_ns),
            _ints(spans.end_ns),
            _ints(spans.queue_end_ns),
            _ints(spans.prefill_end_ns),
            _ints(spans.input_tokens),
            _ints(spans.output_tokens),
        )

    @classmethod
    def empty(cls) -> SpanSet:
        return cls.of(SpanColumns.empty())

    def take(self, index: Sequence[int] | Int64Array) -> SpanSet:
        chosen = np.asarray(index, dtype=np.int64)
        positions = chosen.tolist()
        lists = [[column[i] for i in positions] for column in self._lists()]
        arrays = [array[chosen] for array in self._arrays()]
        return SpanSet(*lists, *arrays)  # type: ignore[arg-type]  # _lists and _arrays are the fields in order

    @staticmethod
    def concat(parts: Sequence[SpanSet]) -> SpanSet:
        parts = [part for part in parts if len(part)]
        if not parts:
            return SpanSet.empty()
        if len(parts) == 1:
            return parts[0]
        lists = [[v for part in parts for v in part._lists()[i]] for i in range(8)]
        arrays = [np.concatenate([part._arrays()[i] for part in parts]) for i in range(6)]
        return SpanSet(*lists, *arrays)  # type: ignore[arg-type]  # _lists and _arrays are the fields in order

    def _lists(self) -> tuple[list[Any], ...]:
        return (
            self.request_id,
            self.span_id,
            self.hostname,
            self.workload,
            self.pid,
            self.service_name,
            self.model,
            self.tenant,
        )

    def _arrays(self) -> tuple[Int64Array, ...]:
        return (
            self.start_ns,
            self.end_ns,
            self.queue_end_ns,
            self.prefill_end_ns,
            self.input_tokens,
            self.output_tokens,
        )


class SpanWindow:
    def __init__(self, window_ns: int = WINDOW_NS, max_spans: int = MAX_SPANS) -> None:
        self.window_ns = window_ns
        self.max_spans = max_spans
        self._lock = threading.Lock()
        self._incoming: list[SpanColumns] = []
        self._horizon: dict[str, int] = {}  # per host (see the module docstring); absent: NEVER
        self._floor = NEVER  # every host's horizon is at least this (spans dropped for age or number)
        self.spans = SpanSet.empty()
        self._host: Int64Array = np.empty(0, np.int64)  # host code per span
        self._host_code: dict[str, int] = {}
        self._keys: set[SpanKey] = set()
        self._by_request: dict[str, list[int]] = {}

    def add(self, spans: SpanColumns) -> None:
        """New spans, just committed (a store's span listener: any thread)."""
        with self._lock:
            self._incoming.append(spans)

    def recover(self, latest_end_ns: dict[str, int]) -> None:
        """The store's latest span end per host when this engine began: those spans are not here."""
        with self._lock:
            for host, end_ns in latest_end_ns.items():
                self._horizon[host] = max(self._horizon.get(host, NEVER), end_ns + 1)

    def covers(self, host: str, since_ns: int) -> bool:
        """Every stored span of ``host`` that ends at or after ``since_ns`` is here."""
        with self._lock:
            return since_ns >= max(self._floor, self._horizon.get(host, NEVER))

    def positions(self, request_id: str) -> list[int] | None:
        return self._by_request.get(request_id)

    def overlapping(self, host: str, since_ns: int, until_ns: int) -> Int64Array:
        """Positions of the spans of ``host`` with start_ns <= until_ns and end_ns >= since_ns."""
        code = self._host_code.get(host)
        if code is None:
            return np.empty(0, np.int64)
        spans = self.spans
        return np.flatnonzero((self._host == code) & (spans.end_ns >= since_ns) & (spans.start_ns <= until_ns))

    def refresh(self) -> None:
        """Take in the spans added since the last refresh, and drop the old ones (engine thread)."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
        fresh: list[SpanSet] = []
        for columns in incoming:
            keys = list(zip(columns.request_id, columns.span_id, strict=True))
            known = self._keys
            if any(key in known for key in keys) or len(set(keys)) < len(keys):  # loaded from the store before
                chosen: dict[SpanKey, int] = {}
                for i, key in enumerate(keys):
                    if key not in known:
                        chosen.setdefault(key, i)
                columns = columns.take(chosen.values())
                keys = list(chosen)
            known.update(keys)
            fresh.append(SpanSet.of(columns))
        if fresh:
            base = len(self.spans)
            added = SpanSet.concat(fresh)
            for host in set(added.hostname) - self._host_code.keys():
                self._host_code[host] = len(self._host_code)
            codes = self._host_code
            self._host = np.concatenate([self._host, _ints([codes[h] for h in added.hostname])])
            by_request = self._by_request
            for i, rid in enumerate(added.request_id, base):
                found = by_request.get(rid)
                if found is None:
                    by_request[rid] = [i]
                else:
                    found.append(i)
            self.spans = SpanSet.concat([self.spans, added])
        self._drop_old()

    def _drop_old(self) -> None:
        spans = self.spans
        n = len(spans)
        if not n:
            return
        cutoff = int(spans.end_ns.max()) - self.window_ns
        if n > self.max_spans:
            cutoff = max(cutoff, int(np.partition(spans.end_ns, n - self.max_spans)[n - self.max_spans]))
        old = spans.end_ns < cutoff
        dropped = int(np.count_nonzero(old))
        # rebuilding the indexes costs a pass over the window: done when a quarter of it (or more) goes
        if not dropped or (dropped < n // 4 and n <= self.max_spans):
            return
        if n > self.max_spans:
            old = spans.end_ns <= cutoff
        with self._lock:
            self._floor = max(self._floor, cutoff + 1 if n > self.max_spans else cutoff)
        keep = np.flatnonzero(~old)
        self.spans = spans.take(keep)
        self._host = self._host[keep]
        self._keys = set(zip(self.spans.request_id, self.spans.span_id, strict=True))
        by_request: dict[str, list[int]] = {}
        for i, rid in enumerate(self.spans.request_id):
            found = by_request.get(rid)
            if found is None:
                by_request[rid] = [i]
            else:
                found.append(i)
        self._by_request = by_request

    def __len__(self) -> int:
        return len(self.spans)
