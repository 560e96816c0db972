"""The request engine's memory of recent spans: what the store was just handed, kept as columns, so that a pass does
not read back the spans it needs (measured: reading and rebuilding them was most of the engine's 200 us a span).

The store hands every span write's new spans to ``SpanWindow.add`` once committed (``Store.add_span_listener``),
on the writer's thread; ``refresh``, on the engine's thread, takes them in. The store stays the source of truth:

- a host's spans are all here from its horizon on (``covers``): every span stored on it with ``end_ns`` at or past
  the horizon. At start the horizon is past the latest span the store held (``recover``: those came before this
  engine); dropping old spans (taken in ``WINDOW_NS`` ago, or the earliest ends beyond ``MAX_SPANS``) moves it past
  the latest end dropped. Before the horizon (spans older than the window, spans stored before a restart), the
  engine reads the store;
- a pending request's spans come from here only when here are as many of them as the store counts.

Spans age by when they were taken in, not by their times: an engine behind a burst of spans (the end-to-end bench
sends 200 s of span time in 5 s) still finds the spans of the requests it has yet to compute here (by span time,
60 s fell behind in 1.5 s of such a burst, and the engine read 10 us a span back from the store).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from collector.store.base import Int64Array, SpanColumns

S = 1_000_000_000
WINDOW_NS = 60 * S  # spans taken in this long ago (monotonic) are dropped (a pending request is younger)
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
        lists = pick_items(self._lists(), chosen)
        arrays = [array[chosen] for array in self._arrays()]
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


def pick_items(columns: Iterable[list[Any]], chosen: Int64Array) -> list[list[Any]]:
    """The items at ``chosen`` of each list: a slice when they are a run of consecutive positions (the usual
    case: spans come in the order they end), else one C-level lookup per item rather than a comprehension."""
    k = chosen.size
    if k > 1 and int(chosen[-1]) - int(chosen[0]) == k - 1 and bool(np.all(np.diff(chosen) == 1)):
        lo, hi = int(chosen[0]), int(chosen[-1]) + 1
        return [column[lo:hi] for column in columns]
    positions = chosen.tolist()
    if k < 2:  # itemgetter of one position gives the item, not a tuple
        return [[column[i] for i in positions] for column in columns]
    getter = itemgetter(*positions)
    return [list(getter(column)) for column in columns]


class SpanWindow:
    def __init__(
        self,
        window_ns: int = WINDOW_NS,
        max_spans: int = MAX_SPANS,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.window_ns = window_ns
        self.max_spans = max_spans
        self.monotonic_ns = monotonic_ns
        self._lock = threading.Lock()
        self._incoming: list[SpanColumns] = []
        self._horizon: dict[str, int] = {}  # per host (see the module docstring); absent: NEVER
        self._floor = NEVER  # every host's horizon is at least this (spans dropped for age or number)
        self._host_code: dict[str, int] = {}
        # every span taken in gets the next number; a request's are found by number (``numbers``), so that dropping
        # spans moves the others' positions without re-indexing them
        self._next_number = 0
        self._by_request: dict[str, int | list[int]] = {}
        self._reset(SpanSet.empty(), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))

    def _reset(self, spans: SpanSet, host: Int64Array, number: Int64Array, taken_ns: Int64Array) -> None:
        """Hold ``spans`` (lists owned here, grown in place; arrays with room to grow), their host codes, their
        numbers (increasing) and when they were taken in (monotonic ns, not decreasing). The index by request is
        not touched."""
        n = len(spans)
        self._n = n
        self._lists = [list(column) for column in spans._lists()]
        room = max(2 * n, 1024)
        self._arrays = [np.empty(room, np.int64) for _ in range(9)]
        for into, values in zip(self._arrays, (*spans._arrays(), host, number, taken_ns), strict=True):
            into[:n] = values
        self._view: SpanSet | None = None

    @property
    def spans(self) -> SpanSet:
        """The spans held (a view: valid until the next ``refresh``)."""
        if self._view is None:
            n = self._n
            self._view = SpanSet(*self._lists, *(array[:n] for array in self._arrays[:6]))  # type: ignore[arg-type]
        return self._view

    def add(self, spans: SpanColumns) -> None:
        """New spans, just committed (a store's span listener: any thread)."""
        with self._lock:
            self._incoming.append(spans)

    def recover(self, latest_end_ns: dict[str, int]) -> None:
        """Per host, a latest span end up to which stored spans may not be here: the store's when this engine began,
        or a write's whose commit was lost (``Store.add_span_listener``'s ``missed``); the store is read there."""
        with self._lock:
            for host, end_ns in latest_end_ns.items():
                self._horizon[host] = max(self._horizon.get(host, NEVER), end_ns + 1)

    def covers(self, host: str, since_ns: int) -> bool:
        """Every stored span of ``host`` that ends at or after ``since_ns`` is here."""
        with self._lock:
            return since_ns >= max(self._floor, self._horizon.get(host, NEVER))

    def _index(self, request_ids: list[str], base: int) -> None:
        # a number, or a list of them for a request with several spans: no list (a tracked container the garbage
        # collector walks) per span in the usual case
        by_request = self._by_request
        for i, rid in enumerate(request_ids, base):
            found = by_request.setdefault(rid, i)
            if found != i:
                if isinstance(found, list):
                    found.append(i)
                else:
                    by_request[rid] = [found, i]

    def _unindex(self, request_ids: Iterable[str], numbers: Iterable[int]) -> None:
        by_request = self._by_request
        for rid, number in zip(request_ids, numbers, strict=True):
            found = by_request[rid]
            if isinstance(found, int):
                del by_request[rid]
            else:
                found.remove(number)
                if len(found) == 1:
                    by_request[rid] = found[0]

    def numbers(self, request_ids: Iterable[str]) -> list[int | list[int] | None]:
        """Per request, the numbers of its spans held here: one (an int), several (a list, in the order taken in),
        or None when none is here; ``extents`` takes them."""
        return list(map(self._by_request.get, request_ids))

    def extents(self, numbers: list[int]) -> tuple[list[str], Int64Array, Int64Array]:
        """Hostname, start and end of the spans with those ``numbers`` (spans held here)."""
        n = self._n
        held = self._arrays[7][:n]
        wanted = np.array(numbers, dtype=np.int64)
        if n and int(held[-1]) - int(held[0]) == n - 1:  # none dropped between the first and the last held
            chosen = wanted - held[0] if wanted.size else wanted
        else:
            chosen = np.searchsorted(held, wanted)
        [hosts] = pick_items([self._lists[2]], chosen)
        return hosts, self._arrays[0][:n][chosen], self._arrays[1][:n][chosen]

    def overlapping(self, host: str, since_ns: int, until_ns: int) -> Int64Array:
        """Positions of the spans of ``host`` with start_ns <= until_ns and end_ns >= since_ns."""
        code = self._host_code.get(host)
        if code is None:
            return np.empty(0, np.int64)
        n = self._n
        start, end, hosts = self._arrays[0][:n], self._arrays[1][:n], self._arrays[6][:n]
        return np.flatnonzero((hosts == code) & (end >= since_ns) & (start <= until_ns))

    def refresh(self) -> list[SpanColumns]:
        """Take in the spans added since the last refresh, and drop the old ones (engine thread); returns the spans
        taken in."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for columns in incoming:  # new spans only: the store hands each span once, when it is first stored
            if len(columns):
                self._append(columns)
        self._drop_old()
        return incoming

    def _append(self, columns: SpanColumns) -> None:
        base, k = self._n, len(columns)
        for host in set(columns.hostname) - self._host_code.keys():
            self._host_code[host] = len(self._host_code)
        codes = self._host_code
        host_codes = [codes[columns.hostname[0]]] * k if len(codes) == 1 else [codes[h] for h in columns.hostname]
        texts: tuple[list[Any], ...] = (
            columns.request_id, columns.span_id, columns.hostname, columns.workload, columns.pid,
            columns.service_name, columns.model, columns.tenant,
        )  # fmt: skip
        for column, more in zip(self._lists, texts, strict=True):
            column.extend(more)
        if base + k > self._arrays[0].size:
            room = max(2 * (base + k), 1024)
            self._arrays = [np.concatenate([array[:base], np.empty(room - base, np.int64)]) for array in self._arrays]
        numbers: tuple[list[int], ...] = (
            columns.start_ns, columns.end_ns, columns.queue_end_ns, columns.prefill_end_ns, columns.input_tokens,
            columns.output_tokens, host_codes,
        )  # fmt: skip
        for array, values in zip(self._arrays[:7], numbers, strict=True):
            array[base : base + k] = values
        first = self._next_number
        self._arrays[7][base : base + k] = np.arange(first, first + k, dtype=np.int64)
        self._arrays[8][base : base + k] = self.monotonic_ns()
        self._index(columns.request_id, first)
        self._next_number = first + k
        self._n = base + k
        self._view = None

    def _drop_old(self) -> None:
        n = self._n
        if not n:
            return
        end = self._arrays[1][:n]
        # taken in order: those taken in before the window are the first ones
        aged = int(np.searchsorted(self._arrays[8][:n], self.monotonic_ns() - self.window_ns))
        crowded = n > self.max_spans
        # compacting the columns costs a pass over the window: done when a quarter of it (or more) goes
        if not crowded and (not aged or aged < n // 4):
            return
        old = np.zeros(n, dtype=bool)
        old[:aged] = True
        if crowded:  # and the earliest ends, down to max_spans
            old |= end <= int(np.partition(end, n - self.max_spans)[n - self.max_spans])
        if not old.any():
            return
        with self._lock:  # every span ending after the latest end dropped is still here
            self._floor = max(self._floor, int(end[old].max()) + 1)
        keep = np.flatnonzero(~old)
        gone = np.flatnonzero(old)
        [gone_ids] = pick_items([self._lists[0]], gone)
        self._unindex(gone_ids, self._arrays[7][:n][gone].tolist())
        self._reset(
            self.spans.take(keep), self._arrays[6][:n][keep], self._arrays[7][:n][keep], self._arrays[8][:n][keep]
        )

    def __len__(self) -> int:
        return self._n
