"""The request engine: pending requests in, energy per request out (issue 5), on the aggregator's own thread.

Every ``[requests] interval_s`` (at once again after a full pass), one pass:

1. up to ``max_per_pass`` pending requests, oldest end first (``_pending``: those the spans handed to the engine made
   pending, and the store's list, ``Store.pending_request_counts``, at the first pass, every few seconds and after a
   reopen), and all their spans;
2. their neighbours: every span on their hosts overlapping them (a request's energy depends on every request that
   shared its workload). Neighbour requests whose stored result a new span may have changed are recomputed too;
3. per host and cluster of overlapping time, every span overlapping the cluster, its workload resolved
   (``request_resolve``), the workloads' per-device counters, the devices' samples and idle series loaded once,
   and the energy split (``request_split``, with the kernel ``request_energy.attribute_requests``);
4. per request, its spans summed with numpy (a request may have spans on several hosts; energies and tokens add
   up), its status decided, and the results written as columns in one transaction (the store keeps a request
   pending when a span came after the engine read them: the span count it was computed from is the guard).

Spans come from the engine's memory (``request_window``: the store hands it every span write's new spans once
committed), not from the store: a request's spans when the memory holds as many as the store counts, a host's
neighbours when the memory covers the time and no other open store (another aggregator sharing the database) stored
spans of the host then (``Store.spans_written_elsewhere``, one index read). The store is read for the rest: after a
restart (spans stored before the engine began), for spans older than the memory keeps, for a host's time that
another aggregator was sent spans of too, and for a request whose result came back stale.

Status: ``final`` once every span is ready (``request_split``: samples cover it and are there past its end on every
device of its workload, with no gap); else, ``finalize_grace_s`` after its end, ``approximate`` (what the samples
there are give: a lower bound) or ``no_samples`` (no energy: its hosts sent no samples for its time, or its
workload could not be resolved); else it stays pending. A request not ready is retried with backoff (1 pass, then
doubling to 8 s, and always at its grace deadline), so that requests waiting on a silent host do not widen every
pass's window.

Views: ``active_j`` = sum over its spans and over the devices of each span's workload that add into host totals
of its share of the workload's measured energy; ``gpu_j``, ``cpu_j``, ``dram_j`` are its parts by device kind.
``full_j`` = (``active_j`` + its share of the idle energy of those devices: each device's ``idle`` series split
among all requests running on the device, with the same weights) x ``[requests] pue``. A device's idle energy at
times when no request runs on it stays unattributed (it is in ``wattmeter_fleet_energy_joules{phase="idle"}``).

Revisions: a late span makes its own request pending (the store does that) and changes its neighbours' shares.
Every settled neighbour is recomputed with the pass; a pending one (known so here, or in the store) is left to a
pass that takes it, with its own neighbours. What a neighbour holds, and from how many spans, is what the store
says (``Store.request_states``, one read a pass: this engine's memory of what it wrote cannot tell that a late span
made one pending since, nor what another aggregator wrote). A request whose spans in memory are fewer than that is
drawn from the store's; one with more spans collected than its clusters were drawn from (a host's time read from
the store had another aggregator's) is not written, and the next pass takes it with its spans from the store. A
settled neighbour is rewritten when it comes out with another status or energy
(``wattmeter_request_revisions_total``), an approximate one staying approximate past its grace, a final one only
when it comes out final (a neighbour whose raw samples were pruned keeps its stored result). Late samples cannot
change a final request: it is final only once the samples past its end are there with no gap before. The metrics
count a request the first time this engine writes it (a no_samples one again, with its energy, once it has some),
and a neighbour's rewrite as a revision; a request that late samples reopen is a revision too, whoever wrote it
(``Store.reopen_requests`` says it was settled), but one made pending again by a late span of its own that this
engine never wrote (written before a restart, or by another aggregator) counts as a request again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice, repeat

import numpy as np
import numpy.typing as npt

from collector.aggregator.config import RequestsConfig
from collector.aggregator.request_metrics import RequestMetrics
from collector.aggregator.request_resolve import HostBindings, HostWorkloads
from collector.aggregator.request_split import Device, Series, SpanEnergy, split, summed
from collector.aggregator.request_weights import stretches
from collector.aggregator.request_window import SpanSet, SpanWindow, pick_items
from collector.carbon.series import IntensitySeries
from collector.store.base import (
    HostRow,
    Int64Array,
    ProcessBindingRow,
    RequestState,
    ResultColumns,
    SpanKey,
    Store,
    WorkloadEnergyRow,
)

log = logging.getLogger(__name__)

S = 1_000_000_000
PAD_NS = 3 * S  # samples loaded beyond a cluster's spans: enough to bracket them and to see SETTLE_NS past the end
CLUSTER_GAP_NS = 1 * S  # spans on one host closer than this in time are attributed in one window
MAX_RETRY_NS = 8 * S
MINUTE_NS = 60 * S
REMEMBERED = 200_000  # requests the engine remembers having written (about 100 bytes each)
REOPENED_KEPT = 200_000  # requests a reopen found counted, kept until computed (another aggregator may take them)
STORE_CHECK_S = 5.0  # the store's pending requests are read this often even when the engine's memory has them all
KNOWN_PER_PASS = 10  # pending requests known from memory: at most this many passes' worth (beyond: the store's list)
IDLE = ("idle", "", "")


@dataclass(frozen=True)
class PassStats:
    pending: int  # pending requests taken
    written: int  # results written (first ones and revisions)
    finished: int  # requests that became final, approximate or no_samples
    revised: int
    full: bool  # the pass took max_per_pass requests: another follows at once


STATUS_NAMES = ("final", "approximate", "no_samples")
_NOT_FINAL_SETTLED = frozenset(STATUS_NAMES[1:])
_PENDING: RequestState = ("pending", None, None, 0)  # a neighbour not stored (pruned meanwhile) is left pending


class _Collected:
    """The spans of wanted requests met in a pass's windows, with their energy: parallel parts, one per window,
    summed per request at the end (``_settle``)."""

    def __init__(self) -> None:
        self.request_id: list[str] = []
        self.hostname: list[str] = []
        self.model: list[str] = []
        self.tenant: list[str] = []
        self.arrays: list[list[np.ndarray]] = [[] for _ in range(10)]  # see _collect

    def add(self, host: str, spans: SpanSet, index: Int64Array, energy: SpanEnergy) -> None:
        request_id, model, tenant = pick_items((spans.request_id, spans.model, spans.tenant), index)
        self.request_id += request_id
        self.hostname += [host] * index.size
        self.model += model
        self.tenant += tenant
        measured = energy.measured[index]
        parts = (
            spans.start_ns[index],
            spans.end_ns[index],
            spans.input_tokens[index],
            spans.output_tokens[index],
            measured,
            energy.ready[index],
            # a span's joules count only when some device of its workload had samples during it
            np.where(measured, energy.by_kind["gpu"][index], 0.0),
            np.where(measured, energy.by_kind["cpu"][index], 0.0),
            np.where(measured, energy.by_kind["dram"][index], 0.0),
            np.where(measured, energy.idle_j[index], 0.0),
        )
        for into, part in zip(self.arrays, parts, strict=True):
            into.append(part)


@dataclass(frozen=True)
class _Extents:
    """Spans' hosts and times: what clustering needs."""

    hostname: list[str]
    start_ns: Int64Array
    end_ns: Int64Array

    def __len__(self) -> int:
        return len(self.hostname)

    def plus(self, other: _Extents) -> _Extents:
        return _Extents(
            self.hostname + other.hostname,
            np.concatenate([self.start_ns, other.start_ns]),
            np.concatenate([self.end_ns, other.end_ns]),
        )


def _clusters(spans: _Extents) -> dict[str, list[tuple[int, int]]]:
    """Per host, the windows [lo, hi] (Unix ns) of its spans, merged where closer than CLUSTER_GAP_NS."""
    out: dict[str, list[tuple[int, int]]] = {}
    if not len(spans):
        return out
    hosts = spans.hostname
    names = sorted(set(hosts))
    for host in names:
        if len(names) == 1:
            start, end = spans.start_ns, spans.end_ns
        else:
            mine = np.fromiter((h == host for h in hosts), bool, len(hosts))
            start, end = spans.start_ns[mine], spans.end_ns[mine]
        order = np.argsort(start, kind="stable")
        start, end = start[order], end[order]
        reach = np.maximum.accumulate(end)
        # a window opens where a span starts more than CLUSTER_GAP_NS after every span before it ended
        opens = np.flatnonzero(np.concatenate([[True], start[1:] > reach[:-1] + CLUSTER_GAP_NS]))
        closes = np.concatenate([opens[1:] - 1, [start.size - 1]])
        out[host] = list(zip(start[opens].tolist(), reach[closes].tolist(), strict=True))
    return out


def _differs(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is not b
    return abs(a - b) > 1e-9 * max(abs(a), abs(b))  # relative at every scale (conservation holds to 1e-9 of any total)


def _hosts_text(hosts: set[str]) -> str:
    return json.dumps(sorted(hosts), ensure_ascii=False, separators=(",", ":"))


class RequestEngine:
    """Attributes pending requests; ``run_pass`` does one pass (tests call it directly), ``start`` runs passes on a
    thread every ``interval_s`` until ``stop``. ``clock_ns`` gives the wall clock that grace deadlines are
    measured on (Unix ns, as span times are). It listens to ``store``'s span writes from its construction on
    (``request_window``)."""

    def __init__(
        self,
        store: Store,
        config: RequestsConfig,
        metrics: RequestMetrics | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        window: SpanWindow | None = None,
        carbon: Callable[[], IntensitySeries] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.carbon = carbon
        """The grid's current intensity and price series ([carbon]); None: requests get no gCO2e or cost."""
        self.config = config
        self.metrics = metrics if metrics is not None else RequestMetrics(config.max_label_values)
        self.clock_ns = clock_ns
        self.monotonic = monotonic  # when the store's pending list is read again (STORE_CHECK_S)
        # the requests it wrote, in the order written, oldest first (writing one again is a revision), each with
        # whether it was counted with its energy (False: counted as no_samples, to be counted with energy once it has
        # some); and those a reopen found settled, the same way, until they are written again
        self._written: dict[str, bool] = {}
        self._counted_elsewhere: dict[str, bool] = {}
        self._retry: dict[str, tuple[int, int]] = {}  # request -> (not before ns, backoff ns)
        self._from_store: set[str] = set()  # requests whose result was stale: read their spans from the store
        # per host: its bindings as read, and as resolved
        self._binding_rows: dict[str, list[ProcessBindingRow]] = {}
        self._bindings: dict[str, HostBindings] = {}
        # pending requests (those with spans and no result since) known from the spans the store handed the window
        # and from the store's list, in the order they became known (a dict for its order)
        self._known: dict[str, None] = {}
        self._store_check_at = 0.0  # monotonic; 0: at the next pass (spans stored before this engine began)
        self._again: set[str] = set()  # settled requests to compute again next pass, as neighbours (partial ones)
        self._overflowed = False  # more pending than memory keeps: the store's list every pass until it is short
        # reopens (host, since, until) since the pass began; a pass writes its results holding the lock
        self._results_lock = threading.Lock()
        self._reopened: list[tuple[str, int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.window = window if window is not None else SpanWindow()
        # listening first: a span committed after the store's latest ends were read is in the window
        store.add_span_listener(self.window.add, missed=self.window.recover)
        self.window.recover(store.latest_span_ends())

    # -- the thread

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="request-engine", daemon=True)
        self._thread.start()

    def _footprints(
        self, start_ns: npt.NDArray[np.int64], end_ns: npt.NDArray[np.int64], active_j: list[float | None]
    ) -> tuple[list[float | None], list[float | None]]:
        """gCO2e and cost of each result's active energy over its time (``RequestResult.co2_g``); Nones without
        [carbon] or energy. A series that cannot price (a broken CSV) leaves them None rather than failing the pass."""
        none: list[float | None] = [None] * len(active_j)
        if self.carbon is None or not active_j:
            return none, list(none)
        try:
            series = self.carbon()
            energy = np.array([0.0 if j is None else j for j in active_j])
            grams, cost = series.per_interval(start_ns, end_ns, energy)
        except Exception:  # the energy results are written all the same
            log.exception("pricing requests' energy failed")
            return none, list(none)
        has = np.array([j is not None for j in active_j])
        # NaN: no intensity (price) data at any of the request's time: unknown (None), as without energy
        co2 = [g if h else None for g, h in zip(grams.tolist(), (has & np.isfinite(grams)).tolist(), strict=True)]
        if cost is None:
            return co2, list(none)
        money = [c if h else None for c, h in zip(cost.tolist(), (has & np.isfinite(cost)).tolist(), strict=True)]
        return co2, money

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            full = False
            try:
                full = self.run_pass().full
            except Exception:  # a failing store or a bug: logged, counted, tried again next interval
                log.exception("a request attribution pass failed")
                self.metrics.pass_failed()
            if not full:
                self._stop.wait(self.config.interval_s)

    def note_requests_reopened(self, previous: Mapping[str, str] | None = None) -> None:
        """Requests were made pending in the store (``Store.reopen_requests``, which says the status each had):
        the next pass reads its list. Those counted already (by this engine, before a restart or by another
        aggregator) are revised when computed again, not counted again: an approximate one was counted with its
        energy, a no_samples one is counted with its energy once it has some."""
        if previous:
            with self._results_lock:
                self._note_counted(previous)
        self._store_check_at = 0.0

    def _note_counted(self, previous: Mapping[str, str]) -> None:
        """(holding ``_results_lock``) ``previous``, reopened with the status each had, were counted already."""
        elsewhere = self._counted_elsewhere
        for rid, status in previous.items():
            elsewhere[rid] = elsewhere.pop(rid, False) or status != "no_samples"
        if len(elsewhere) > REOPENED_KEPT:  # those never computed here again (another aggregator settled them)
            for rid in list(islice(elsewhere, len(elsewhere) - REOPENED_KEPT)):
                del elsewhere[rid]

    @contextlib.contextmanager
    def reopening(self, hostname: str, since_ns: int, until_ns: int) -> Iterator[dict[str, str]]:
        """Around ``Store.reopen_requests`` (late samples of ``hostname`` in [since_ns, until_ns] were stored): a
        pass does not write meanwhile, and one under way (it may have read the samples before them) writes no
        approximate or no_samples result with a span on that host and time that the reopen concerns: a pending one
        stays pending, computed again by the next pass (the reopen had nothing to reopen), a neighbour the reopen
        made pending is left to it. What the reopen returns goes in the dict yielded: noted before any pass can
        write them (``note_requests_reopened``)."""
        with self._results_lock:
            self._reopened.append((hostname, since_ns, until_ns))
            previous: dict[str, str] = {}
            yield previous
            self._note_counted(previous)

    # -- one pass

    def _pending(self, limit: int) -> tuple[dict[str, int | None], int, bool]:
        """Up to ``limit`` pending requests, first known first, each with the store's span count when this pass read
        it (None: not read); how many are pending; whether more are than taken.

        The engine knows the requests made pending by the spans the store handed its window. The store's list is
        read at the first pass, every STORE_CHECK_S, after a reopen, and every pass while more are pending than
        memory keeps: it adds what was made pending otherwise (stored before this engine began, reopened, another
        aggregator's spans), and when it is all of them, what memory holds beyond it was settled elsewhere. A
        request taken from memory with spans the window lacks comes back stale from the store and is read from it
        next (``_from_store``).

        First known first: servers report a span when its request ends, so about the oldest end first, as the
        store's list is (at the first pass, and what a later read adds goes after what memory holds). Taking them
        so costs nothing a request; picking the oldest ends of a backlog costs 2-8 us a request taken
        (``heapq.nsmallest`` of 20,000 among 40,000-200,000, on the README's VM)."""
        known = self._known
        for columns in self.window.refresh():
            known.update(dict.fromkeys(columns.request_id))
        if len(known) > KNOWN_PER_PASS * limit:
            known.clear()
            self._overflowed = True
        counts: dict[str, int] = {}
        checked = self.monotonic()
        if self._overflowed or checked >= self._store_check_at:
            self._store_check_at = checked + STORE_CHECK_S  # before the query: a reopen told meanwhile stands
            try:
                taken = self.store.pending_request_counts(limit)
            except BaseException:
                self._store_check_at = 0.0
                raise
            counts = dict(taken)
            # a list cut at the limit: more may be pending than memory knows (a backlog from before this engine, a
            # large reopen): it is read again next pass, and the pass is full
            self._overflowed = len(taken) >= limit
            if not self._overflowed:  # the whole list (the window took in what was committed before it was read)
                for rid in [rid for rid in known if rid not in counts]:
                    del known[rid]
            known.update(dict.fromkeys(rid for rid in counts if rid not in known))
        chosen: Iterable[str] = known if len(known) <= limit else islice(known, limit)
        return {rid: counts.get(rid) for rid in chosen}, len(known), self._overflowed or len(known) > limit

    def _extents_of(
        self, request_ids: Sequence[str], counts: Iterable[int | None], spans_of: dict[str, int]
    ) -> _Extents:
        """Host and times of every span of those requests: from the window where it holds all of a request's, else
        the store. ``counts``: the store's span count of each request (None: not known); a request of which the
        window holds some spans but not that many is read from the store from now on (``_from_store``).
        ``spans_of`` gets each request's number of spans found."""
        window = self.window
        from_store = self._from_store
        numbers: list[int] = []
        missing: list[str] = []
        for rid, found, count in zip(request_ids, window.numbers(request_ids), counts, strict=True):
            if found is None:
                missing.append(rid)
            elif isinstance(found, int):
                if count is not None and count != 1:
                    from_store.add(rid)
                    missing.append(rid)
                elif from_store and rid in from_store:
                    missing.append(rid)
                else:
                    numbers.append(found)
                    spans_of[rid] = 1
            elif count is not None and len(found) != count:
                from_store.add(rid)
                missing.append(rid)
            elif rid in from_store:
                missing.append(rid)
            else:
                numbers += found
                spans_of[rid] = len(found)
        extents = _Extents(*window.extents(numbers))
        if missing:
            stored = self.store.request_span_columns(missing)
            for rid in stored.request_id:
                spans_of[rid] = spans_of.get(rid, 0) + 1
            extents = _Extents(
                extents.hostname + stored.hostname,
                np.concatenate([extents.start_ns, np.array(stored.start_ns, dtype=np.int64)]),
                np.concatenate([extents.end_ns, np.array(stored.end_ns, dtype=np.int64)]),
            )
        return extents

    def _overlapping(self, host: str, lo: int, hi: int) -> SpanSet:
        """Every span of ``host`` overlapping [lo, hi], from the window when it covers the time and no one else
        stored spans of the host then (another aggregator sharing the database), else the store."""
        if self.window.covers(host, lo) and not self.store.spans_written_elsewhere(host, lo, hi):
            return self.window.spans.take(self.window.overlapping(host, lo, hi))
        return SpanSet.of(self.store.spans_overlapping_columns(host, lo, hi))

    def run_pass(self) -> PassStats:
        with self._results_lock:  # before the samples are read: a reopen from now on is one this pass may miss
            self._reopened.clear()
        now = self.clock_ns()
        taken, pending_now, full = self._pending(self.config.max_per_pass)
        retry = self._retry
        if retry:
            pending_counts = {rid: count for rid, count in taken.items() if rid not in retry or retry[rid][0] <= now}
        else:
            pending_counts = taken
        again, self._again = self._again, set()
        if not pending_counts and not again:  # none, or all waiting (backoff): no pass follows at once
            self.metrics.set_pending(pending_now)
            return PassStats(len(taken), 0, 0, 0, False)
        pending_set = set(pending_counts)
        spans_of: dict[str, int] = {}  # spans of each request its clusters were drawn from
        p_spans = self._extents_of(list(pending_counts), pending_counts.values(), spans_of)
        # neighbours: requests sharing time (and maybe workloads) with the pending ones on their hosts
        neighbours: set[str] = set()
        overlapping: dict[tuple[str, int, int], SpanSet] = {}
        for host, windows in _clusters(p_spans).items():
            for lo, hi in windows:
                near = overlapping[(host, lo, hi)] = self._overlapping(host, lo, hi)
                neighbours |= set(near.request_id) - pending_set
        # a neighbour pending (known so here, or in the store) is left to a pass that takes it, with its own
        # neighbours; the others hold what the store says, with how many spans (memory may hold fewer: another
        # aggregator's, or older than it keeps; a neighbour's clusters must cover all of them). What this engine
        # wrote is not enough: a late span may have made one pending since, which memory did not keep (more pending
        # than it keeps, a reopen it was not told of yet)
        neighbours |= again - pending_set
        neighbours -= self._known.keys()
        states = self.store.request_states(sorted(neighbours)) if neighbours else {}
        pending_there = [rid for rid in neighbours if states.get(rid, _PENDING)[0] == "pending"]
        if pending_there:
            self._known.update(dict.fromkeys(rid for rid in pending_there if rid in states))
            neighbours.difference_update(pending_there)
        c_spans = p_spans
        if neighbours:
            ordered = sorted(neighbours)
            c_spans = p_spans.plus(self._extents_of(ordered, [states[rid][3] for rid in ordered], spans_of))
            self._from_store -= neighbours  # their counts are known every pass they are neighbours
        wanted = pending_set | neighbours

        clusters = _clusters(c_spans)
        if not clusters:  # no spans of them anywhere (pruned, or settled elsewhere)
            return self._settle(now, len(taken), pending_set, neighbours, states, spans_of, _Collected(), full)
        hosts = {row.hostname: row for row in self.store.hosts()}
        all_lo = min(lo for host_windows in clusters.values() for lo, _ in host_windows)
        all_hi = max(hi for host_windows in clusters.values() for _, hi in host_windows)
        since = all_lo - PAD_NS
        energy_rows = self.store.workload_energy(since - since % MINUTE_NS, all_hi + PAD_NS + 1)
        collected = _Collected()
        for host, host_windows in clusters.items():
            seen: set[SpanKey] | None = set() if len(host_windows) > 1 else None
            for lo, hi in host_windows:
                try:
                    spans = overlapping.get((host, lo, hi))
                    if spans is None:
                        spans = self._overlapping(host, lo, hi)
                    self._attribute_window(host, lo, hi, spans, hosts.get(host), energy_rows, wanted, seen, collected)
                except Exception:  # one host's window failing leaves its requests pending; the others go on
                    log.exception("attributing requests on %s failed", host)
                    self.metrics.pass_failed()
                    self._store_check_at = 0.0  # its requests, uncollected, are forgotten: the store's list next
        return self._settle(now, len(taken), pending_set, neighbours, states, spans_of, collected, full)

    def _host_workloads(self, host: str, spans: SpanSet, names: frozenset[str]) -> HostWorkloads:
        bindings = self._bindings.get(host)
        needs = (
            set()
            if all(spans.workload)
            else {pid for workload, pid in zip(spans.workload, spans.pid, strict=True) if not workload and pid}
        )
        if needs:  # read each pass that finds spans by pid (a few rows a process): a reused pid, a binding stored
            # late, one pruned: the store's as they are now
            rows = self.store.process_bindings(host)
            if bindings is None or rows != self._binding_rows.get(host):
                self._binding_rows[host] = rows
                bindings = self._bindings[host] = HostBindings.of(rows)
        return HostWorkloads(bindings or HostBindings(), names)

    def _attribute_window(
        self,
        host: str,
        lo: int,
        hi: int,
        spans: SpanSet,
        host_row: HostRow | None,
        energy_rows: Sequence[WorkloadEnergyRow],
        wanted: set[str],
        seen: set[SpanKey] | None,
        collected: _Collected,
    ) -> None:
        identities: dict[str, list[tuple[str, str, str]]] = {}
        by_device: dict[tuple[str, str, str], set[str]] = {}
        for row in energy_rows:
            if row.hostname == host and row.phase:  # a workload (idle/system/other and devices have no phase)
                identity = (row.workload, row.phase, row.job)
                identities.setdefault(row.workload, []).append(identity)
                by_device.setdefault(identity, set()).update(row.by_device_j)
        device_rows = {d.device_id: d for d in host_row.devices} if host_row is not None else {}
        resolver = self._host_workloads(host, spans, frozenset(identities))
        workload = resolver.resolve_all(spans.workload, spans.pid, spans.service_name, spans.end_ns.tolist())
        since, until = lo - PAD_NS, hi + PAD_NS + 1
        series: dict[tuple[str, str], Series] = {}
        devices: dict[str, Device] = {}
        for name in sorted({w for w in workload if w is not None and w in identities}):
            per_device: dict[str, list[Series]] = {}
            for identity in identities[name]:
                for device_id in sorted(by_device[identity]):
                    device_row = device_rows.get(device_id)
                    if device_row is None or not device_row.in_host_total:
                        continue
                    samples = self.store.workload_samples(host, identity, device_id, since, until)
                    per_device.setdefault(device_id, []).append(Series.of(samples))
            for device_id, parts in per_device.items():
                series[(name, device_id)] = summed(parts)
                if device_id not in devices:
                    devices[device_id] = self._device(host, device_rows[device_id].kind, device_id, since, until)
        weights = stretches(
            spans.start_ns,
            spans.end_ns,
            spans.queue_end_ns,
            spans.prefill_end_ns,
            spans.input_tokens,
            spans.output_tokens,
            self.config.weight,
        )
        energy = split(spans.start_ns, spans.end_ns, workload, weights, series, devices)
        self._collect(host, spans, energy, wanted, seen, collected)

    def _device(self, host: str, kind: str, device_id: str, since: int, until: int) -> Device:
        series = self.store.device_series(host, device_id, since, until)
        samples = series.samples
        time_ns = np.fromiter((s[0] for s in samples), np.int64, len(samples))
        powered = [(t, p) for t, _, p in samples if p is not None and p == p and p >= 0 and p != float("inf")]
        idle = Series.of(self.store.workload_samples(host, IDLE, device_id, since, until))
        return Device(
            kind,
            time_ns,
            np.fromiter((t for t, _ in powered), np.int64, len(powered)),
            np.fromiter((p for _, p in powered), np.float64, len(powered)),
            idle,
            tuple(series.unmeasured),
        )

    @staticmethod
    def _collect(
        host: str,
        spans: SpanSet,
        energy: SpanEnergy,
        wanted: set[str],
        seen: set[SpanKey] | None,
        collected: _Collected,
    ) -> None:
        keep: list[int] | Int64Array
        if seen is None:
            keep = np.flatnonzero(np.fromiter(map(wanted.__contains__, spans.request_id), bool, len(spans)))
        else:  # the host has several windows: a span may touch two (they never overlap)
            keep = []
            for i, key in enumerate(zip(spans.request_id, spans.span_id, strict=True)):
                if key[0] in wanted and key not in seen:
                    seen.add(key)
                    keep.append(i)
        if len(keep):
            collected.add(host, spans, np.asarray(keep, dtype=np.int64), energy)

    def _settle(
        self,
        now: int,
        taken: int,
        pending: set[str],
        neighbours: set[str],
        states: dict[str, RequestState],
        spans_of: dict[str, int],
        collected: _Collected,
        full: bool,
    ) -> PassStats:
        grace_ns = int(self.config.finalize_grace_s * S)
        pue = self.config.pue
        # per request: its spans summed (numbered in order of first appearance)
        ids = list(dict.fromkeys(collected.request_id))
        m = len(ids)
        if m == len(collected.request_id):  # the usual case: one span each
            code = np.arange(m, dtype=np.int64)
        else:
            number: dict[str, int] = {}
            code = np.array([number.setdefault(rid, len(number)) for rid in collected.request_id], dtype=np.int64)
        if not m:  # no spans of them anywhere (pruned, or settled elsewhere): the store's list has them if pending
            self._forget(pending)
            return PassStats(taken, 0, 0, 0, full)
        start, end, tokens_in, tokens_out, measured, ready, gpu, cpu, dram, idle = (
            np.concatenate(parts) for parts in collected.arrays
        )
        first = np.full(m, code.size, dtype=np.int64)
        np.minimum.at(first, code, np.arange(code.size))
        req_start = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(req_start, code, start)
        req_end = np.full(m, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(req_end, code, end)
        computed = np.bincount(code, minlength=m)
        n_measured = np.bincount(code, weights=measured, minlength=m)
        n_ready = np.bincount(code, weights=ready, minlength=m)
        gpu_j, cpu_j, dram_j, idle_j = (np.bincount(code, weights=w, minlength=m) for w in (gpu, cpu, dram, idle))
        sum_in = np.bincount(code, weights=tokens_in, minlength=m).astype(np.int64)
        sum_out = np.bincount(code, weights=tokens_out, minlength=m).astype(np.int64)
        active_j = gpu_j + cpu_j + dram_j
        full_j = (active_j + idle_j) * pue
        written = self._written
        is_pending = np.fromiter(map(pending.__contains__, ids), bool, m)
        is_final = (n_ready == computed) & (n_measured == computed)
        unsettled_before = {rid for rid in neighbours if states[rid][0] in _NOT_FINAL_SETTLED}
        may_be_late = is_pending
        if unsettled_before:
            may_be_late = is_pending | np.fromiter(map(unsettled_before.__contains__, ids), bool, m)
        late = ~is_final & may_be_late & (now >= req_end + grace_ns)
        settled = is_final | late
        # spans of a request that its clusters were not drawn from (memory had fewer than the store, and a host's
        # time was read from the store: another aggregator's): computed over part of their time, so not written;
        # the next pass computes it again with its spans from the store, a pending one as pending, a settled one as
        # a neighbour
        drawn = np.fromiter(map(spans_of.get, ids, repeat(0)), np.int64, m)
        partial = computed > drawn
        if partial.any():
            settled &= ~partial
            again = [ids[k] for k in np.flatnonzero(partial).tolist()]
            self._from_store.update(again)
            self._again.update(rid for rid in again if rid not in pending)
        no_samples = late & (n_measured == 0)
        # a request with spans on several hosts, or several spans: its names and hosts from all of them
        several = np.flatnonzero(computed > 1).tolist()
        model, tenant, first_host = pick_items((collected.model, collected.tenant, collected.hostname), first)
        host_text = {h: _hosts_text({h}) for h in set(first_host)}
        hosts = list(map(host_text.__getitem__, first_host))
        if several:
            rows_of: dict[int, list[int]] = {k: [] for k in several}
            for i, k in enumerate(code.tolist()):
                found = rows_of.get(k)
                if found is not None:
                    found.append(i)
            for k, rows in rows_of.items():
                model[k] = next((collected.model[i] for i in rows if collected.model[i]), "")
                tenant[k] = next((collected.tenant[i] for i in rows if collected.tenant[i]), "")
                hosts[k] = _hosts_text({collected.hostname[i] for i in rows})
        # requests not settled: pending ones back off
        end_list = req_end.tolist()
        waiting = np.flatnonzero(~settled & is_pending & ~partial).tolist()
        for k in waiting:
            self._back_off(ids[k], now, end_list[k] + grace_ns)
        status_code = np.where(is_final, 0, np.where(no_samples, 2, 1))  # STATUS_NAMES
        # pending requests are all written; a neighbour (not pending: wanted are pending + neighbours) only when its
        # status or energy differs from what it holds (a stored final result is not replaced by a less complete
        # one: a final one is late never)
        candidates = np.flatnonzero(settled & is_pending).tolist()
        chosen = candidates
        near = np.flatnonzero(settled & ~is_pending).tolist()
        if near:
            chosen = list(candidates)
            active_list, full_list = active_j.tolist(), full_j.tolist()
            for k in near:
                before = states[ids[k]]  # a neighbour settled (the pending ones were left out)
                status = STATUS_NAMES[int(status_code[k])]
                if before[0] == status and (
                    status == "no_samples"  # no energy either way
                    or not (_differs(before[1], active_list[k]) or _differs(before[2], full_list[k]))
                ):
                    continue
                chosen.append(k)
        with self._results_lock:  # to the write's commit: a reopen waits, or this pass knows of it
            if self._reopened:
                reopened = self._reopened_during_pass(m, code, collected.hostname, start, end)
                chosen = self._without_reopened(chosen, ids, status_code, is_pending, reopened)
            pick = np.array(chosen, dtype=np.int64)
            codes = status_code[pick].tolist()
            energies: list[list[float | None]] = [
                column[pick].tolist() for column in (active_j, full_j, gpu_j, cpu_j, dram_j)
            ]
            if 2 in codes:  # no_samples: no energy, never 0 J
                for column in energies:
                    for i, c in enumerate(codes):
                        if c == 2:
                            column[i] = None
            co2_g, cost = self._footprints(req_start[pick], req_end[pick], energies[0])
            chosen_ids, chosen_model, chosen_tenant, chosen_hosts = pick_items((ids, model, tenant, hosts), pick)
            out = ResultColumns(
                chosen_ids,
                list(map(STATUS_NAMES.__getitem__, codes)),
                chosen_model,
                chosen_tenant,
                chosen_hosts,
                req_start[pick].tolist(),
                req_end[pick].tolist(),
                sum_in[pick].tolist(),
                sum_out[pick].tolist(),
                energies[0],
                energies[1],
                energies[2],
                energies[3],
                energies[4],
                computed[pick].tolist(),
                [now] * len(chosen),
                co2_g,
                cost,
            )
            stale = set(self.store.write_result_columns(out)) if chosen else set()
            done_ids, done_at = out.request_id, chosen
            if stale:
                kept = [i for i, rid in enumerate(done_ids) if rid not in stale]
                done_ids, done_at = [done_ids[i] for i in kept], [chosen[i] for i in kept]
            # reopened ones counted already (a reopen takes the lock): how, for those written now
            elsewhere = self._counted_elsewhere
            counted_elsewhere = {rid: elsewhere.pop(rid) for rid in done_ids if rid in elsewhere} if elsewhere else {}
        if self._retry:
            deque(map(self._retry.pop, done_ids, repeat(None)), maxlen=0)
        # remembered in the order written (a request written again moves to the end), with whether it was counted
        # with its energy; counted: a pending request written for the first time (a neighbour this engine never
        # wrote was counted by whoever wrote it, as its stored status says), and one counted as no_samples that
        # now has energy
        was: list[bool | None] = list(map(written.pop, done_ids, repeat(None)))
        if counted_elsewhere:
            was = [
                had if rid not in counted_elsewhere else bool(had) or counted_elsewhere[rid]
                for rid, had in zip(done_ids, was, strict=True)
            ]
        priced = (status_code[done_at] != 2).tolist() if done_at else []
        if was.count(None) == len(was) and bool(is_pending[done_at].all()):  # the usual case: all new
            done, priced_now = done_at, list[int]()
            written.update(zip(done_ids, priced, strict=True))
        else:
            done, priced_now = [], []
            for i, (k, had, has) in enumerate(zip(done_at, was, priced, strict=True)):
                if had is None and not is_pending[k]:  # a neighbour written elsewhere: counted as it was stored
                    had = was[i] = states[ids[k]][0] != "no_samples"
                if had is None:
                    done.append(k)
                elif had is False and has:
                    priced_now.append(k)
            written.update((rid, has or bool(had)) for rid, had, has in zip(done_ids, was, priced, strict=True))
        if len(written) > REMEMBERED:
            for rid in list(islice(written, len(written) - REMEMBERED)):
                del written[rid]
        if self._from_store:
            self._from_store.difference_update(done_ids)
        # a stale result: its request has spans this pass did not see; its next pass reads them from the store
        self._from_store.update(rid for rid in stale if rid in pending)
        if done or priced_now:
            pick = np.array(done + priced_now, dtype=np.int64)
            unknown = no_samples[pick]
            done_model, done_tenant = pick_items((model, tenant), pick)
            self.metrics.finished_many(
                done_model,
                done_tenant,
                np.where(unknown, np.nan, active_j[pick]),
                np.where(unknown, np.nan, full_j[pick]),
                sum_out[pick],
            )
        # written, and not for the first time (a stale one was not written)
        revised = len(done_ids) - len(done) - len(priced_now)
        if revised:
            self.metrics.revised(revised)
        self._forget([*done_ids, *pending.difference(ids)])  # pending ones with no spans anywhere too
        return PassStats(taken, len(done_ids), len(done) + len(priced_now), revised, full)

    def _reopened_during_pass(
        self, m: int, code: Int64Array, hostname: list[str], start: Int64Array, end: Int64Array
    ) -> npt.NDArray[np.bool_]:
        """Per request, whether one of its spans is on a host and time reopened during the pass (as the store
        reopens: a span on that host overlapping the time)."""
        hit = np.zeros(m, dtype=bool)
        names = np.array(hostname, dtype=object)
        by_host: dict[str, list[tuple[int, int]]] = {}
        for host, since, until in self._reopened:
            by_host.setdefault(host, []).append((since, until))
        for host, ranges in by_host.items():
            on_host = names == host
            if not on_host.any():
                continue
            for since, until in ranges:
                hit[code[on_host & (start <= until) & (end >= since)]] = True
        return hit

    def _without_reopened(
        self,
        chosen: list[int],
        ids: list[str],
        status_code: Int64Array,
        is_pending: npt.NDArray[np.bool_],
        reopened: npt.NDArray[np.bool_],
    ) -> list[int]:
        """``chosen`` without the results that a reopen during the pass makes stale: not final (late
        samples cannot change a final one), with a span on a reopened host and time, and pending (it stays pending,
        computed again by the next pass) or a neighbour the reopen made pending (the store is asked again: one it
        did not reopen keeps its revision)."""
        hit = [k for k in chosen if reopened[k] and status_code[k] != 0]
        if not hit:
            return chosen
        neighbours = [ids[k] for k in hit if not is_pending[k]]
        now = self.store.request_states(neighbours) if neighbours else {}
        dropped = {k for k in hit if is_pending[k] or now.get(ids[k], _PENDING)[0] == "pending"}
        if not dropped:
            return chosen
        return [k for k in chosen if k not in dropped]

    def _forget(self, settled: Iterable[str]) -> None:
        """``settled`` are pending no more (or not found): out of the engine's memory of pending requests."""
        deque(map(self._known.pop, settled, repeat(None)), maxlen=0)
        self.metrics.set_pending(len(self._known))

    def _back_off(self, rid: str, now: int, deadline: int) -> None:
        if len(self._retry) > 10 * self.config.max_per_pass:
            self._retry.clear()  # requests another aggregator settled (a shared database) are never met again
        _, backoff = self._retry.get(rid, (0, 0))
        backoff = min(max(backoff * 2, S), MAX_RETRY_NS)
        self._retry[rid] = (min(now + backoff, deadline), backoff)
