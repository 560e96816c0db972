"""The request engine: pending requests in, energy per request out (issue 5), on the aggregator's own thread.

Every ``[requests] interval_s`` (at once again after a full pass), one pass:

1. up to ``max_per_pass`` pending requests (``Store.pending_requests``, oldest end first) and all their spans;
2. their neighbours: every span on their hosts overlapping them (a request's energy depends on every request that
   shared its workload). Neighbour requests whose stored result a new span may have changed are recomputed too;
3. per host and cluster of overlapping time, every span overlapping the cluster, its workload resolved
   (``request_resolve``), the workloads' per-device counters, the devices' samples and idle series loaded once,
   and the energy split (``request_split``, with the kernel ``request_energy.attribute_requests``);
4. per request, its spans summed (a request may have spans on several hosts; energies and tokens add up), its
   status decided, and the results written in one transaction (the store keeps a request pending when a span came
   after the engine read them: ``RequestResult.spans`` is how many it was computed from).

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

Revisions: a late span makes its own request pending (the store does that) and changes its neighbours' shares. A
neighbour known not pending (it is in the engine's memory of results it wrote, or the pass took every pending
request) is recomputed with the pass, and rewritten when it comes out final and differs from what the engine last
wrote (``wattmeter_request_revisions_total``); a neighbour that is final and comes out less than final (its raw
samples pruned) keeps its stored result. Late samples cannot change a final request: it is final only once the
samples past its end are there with no gap before. The metrics count a request the first time this engine writes
it final or approximate; after a restart, a neighbour finished before it and revised after counts again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from collector.aggregator.config import RequestsConfig
from collector.aggregator.request_metrics import RequestMetrics
from collector.aggregator.request_resolve import HostBindings, HostWorkloads
from collector.aggregator.request_split import Device, Series, SpanEnergy, split, summed
from collector.aggregator.request_weights import stretches
from collector.store.base import (
    HostRow,
    RequestResult,
    RequestStatus,
    SpanKey,
    SpanRow,
    Store,
    WorkloadEnergyRow,
)

log = logging.getLogger(__name__)

S = 1_000_000_000
PAD_NS = 3 * S  # samples loaded beyond a cluster's spans: enough to bracket them and to see SETTLE_NS past the end
CLUSTER_GAP_NS = 1 * S  # spans on one host closer than this in time are attributed in one window
MAX_RETRY_NS = 8 * S
MINUTE_NS = 60 * S
REMEMBERED = 200_000  # results the engine remembers having written (about 100 bytes each)
IDLE = ("idle", "", "")


@dataclass(frozen=True)
class PassStats:
    pending: int  # pending requests taken
    written: int  # results written (first ones and revisions)
    finished: int  # requests that became final, approximate or no_samples
    revised: int
    full: bool  # the pass took max_per_pass requests: another follows at once


@dataclass
class _Written:
    status: str
    active_j: float | None
    full_j: float | None


@dataclass
class _Accumulator:
    model: str = ""
    tenant: str = ""
    start_ns: int = 0
    end_ns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    spans: int = 0
    computed: int = 0
    measured: int = 0
    ready: int = 0
    gpu_j: float = 0.0
    cpu_j: float = 0.0
    dram_j: float = 0.0
    idle_j: float = 0.0

    def __post_init__(self) -> None:
        self.hosts: set[str] = set()


def _clusters(spans: Iterable[SpanRow]) -> dict[str, list[tuple[int, int]]]:
    """Per host, the windows [lo, hi] (Unix ns) of its spans, merged where closer than CLUSTER_GAP_NS."""
    by_host: dict[str, list[tuple[int, int]]] = {}
    for span in spans:
        by_host.setdefault(span.hostname, []).append((span.start_ns, span.end_ns))
    out: dict[str, list[tuple[int, int]]] = {}
    for host, extents in by_host.items():
        extents.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in extents:
            if merged and lo <= merged[-1][1] + CLUSTER_GAP_NS:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        out[host] = merged
    return out


def _key(span: SpanRow) -> SpanKey:
    return (span.request_id, span.span_id)


def _differs(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is not b
    return abs(a - b) > 1e-9 * max(abs(a), abs(b), 1e-12)


class RequestEngine:
    """Attributes pending requests; ``run_pass`` does one pass (tests call it directly), ``start`` runs passes on a
    thread every ``interval_s`` until ``stop``. ``clock_ns`` gives the wall clock that grace deadlines are
    measured on (Unix ns, as span times are)."""

    def __init__(
        self,
        store: Store,
        config: RequestsConfig,
        metrics: RequestMetrics | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics if metrics is not None else RequestMetrics(config.max_label_values)
        self.clock_ns = clock_ns
        self._written: OrderedDict[str, _Written] = OrderedDict()
        self._retry: dict[str, tuple[int, int]] = {}  # request -> (not before ns, backoff ns)
        self._bindings: dict[str, HostBindings] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the thread

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="request-engine", daemon=True)
        self._thread.start()

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

    # -- one pass

    def run_pass(self) -> PassStats:
        now = self.clock_ns()
        limit = self.config.max_per_pass
        taken = self.store.pending_requests(limit)
        full = len(taken) >= limit
        pending = [rid for rid in taken if self._retry.get(rid, (0, 0))[0] <= now]
        if not pending:
            self.metrics.set_pending(len(taken))
            return PassStats(len(taken), 0, 0, 0, full)
        pending_set = set(pending)
        p_spans = self.store.request_spans(pending)
        # neighbours: requests sharing time (and maybe workloads) with the pending ones on their hosts
        neighbours: set[str] = set()
        for host, windows in _clusters(p_spans).items():
            for lo, hi in windows:
                for span in self.store.spans_overlapping(host, lo, hi):
                    rid = span.request_id
                    if rid not in pending_set and (rid in self._written or not full):
                        neighbours.add(rid)
        c_spans = list(p_spans)
        if neighbours:
            c_spans += self.store.request_spans(sorted(neighbours))
        wanted = pending_set | neighbours

        hosts = {row.hostname: row for row in self.store.hosts()}
        clusters = _clusters(c_spans)
        all_lo = min(lo for host_windows in clusters.values() for lo, _ in host_windows)
        all_hi = max(hi for host_windows in clusters.values() for _, hi in host_windows)
        since = all_lo - PAD_NS
        energy_rows = self.store.workload_energy(since - since % MINUTE_NS, all_hi + PAD_NS + 1)
        per_request: dict[str, _Accumulator] = {}
        seen: set[SpanKey] = set()
        for host, host_windows in clusters.items():
            for lo, hi in host_windows:
                try:
                    self._attribute_window(host, lo, hi, hosts.get(host), energy_rows, wanted, seen, per_request)
                except Exception:  # one host's window failing leaves its requests pending; the others go on
                    log.exception("attributing requests on %s failed", host)
                    self.metrics.pass_failed()
        return self._settle(now, taken, pending_set, neighbours, per_request, full)

    def _host_workloads(self, host: str, spans: Sequence[SpanRow], names: frozenset[str]) -> HostWorkloads:
        bindings = self._bindings.get(host)
        needs = {s.pid for s in spans if not s.workload and s.pid}
        if needs and (bindings is None or not needs <= bindings.by_pid.keys()):
            bindings = self._bindings[host] = HostBindings.of(self.store.process_bindings(host))
        return HostWorkloads(bindings or HostBindings(), names)

    def _attribute_window(
        self,
        host: str,
        lo: int,
        hi: int,
        host_row: HostRow | None,
        energy_rows: Sequence[WorkloadEnergyRow],
        wanted: set[str],
        seen: set[SpanKey],
        per_request: dict[str, _Accumulator],
    ) -> None:
        spans = [s for s in self.store.spans_overlapping(host, lo, hi)]
        identities: dict[str, list[tuple[str, str, str]]] = {}
        by_device: dict[tuple[str, str, str], set[str]] = {}
        for row in energy_rows:
            if row.hostname == host and row.phase:  # a workload (idle/system/other and devices have no phase)
                identity = (row.workload, row.phase, row.job)
                identities.setdefault(row.workload, []).append(identity)
                by_device.setdefault(identity, set()).update(row.by_device_j)
        device_rows = {d.device_id: d for d in host_row.devices} if host_row is not None else {}
        resolver = self._host_workloads(host, spans, frozenset(identities))
        workload = [resolver.resolve(s) for s in spans]
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
        start = np.fromiter((s.start_ns for s in spans), np.int64, len(spans))
        end = np.fromiter((s.end_ns for s in spans), np.int64, len(spans))
        energy = split(start, end, workload, stretches(spans, self.config.weight), series, devices)
        self._collect(spans, energy, wanted, seen, per_request)

    def _device(self, host: str, kind: str, device_id: str, since: int, until: int) -> Device:
        samples = self.store.device_samples(host, device_id, since, until)
        time_ns = np.fromiter((s[0] for s in samples), np.int64, len(samples))
        powered = [(t, p) for t, _, p in samples if p is not None and p == p and p >= 0 and p != float("inf")]
        idle = Series.of(self.store.workload_samples(host, IDLE, device_id, since, until))
        return Device(
            kind,
            time_ns,
            np.fromiter((t for t, _ in powered), np.int64, len(powered)),
            np.fromiter((p for _, p in powered), np.float64, len(powered)),
            idle,
        )

    @staticmethod
    def _collect(
        spans: Sequence[SpanRow],
        energy: SpanEnergy,
        wanted: set[str],
        seen: set[SpanKey],
        per_request: dict[str, _Accumulator],
    ) -> None:
        gpu, cpu, dram = (energy.by_kind[kind].tolist() for kind in ("gpu", "cpu", "dram"))
        idle = energy.idle_j.tolist()
        measured = energy.measured.tolist()
        ready = energy.ready.tolist()
        for i, span in enumerate(spans):
            rid = span.request_id
            if rid not in wanted:
                continue
            key = _key(span)
            if key in seen:  # a span in two windows of its host (they never overlap, but it may touch both)
                continue
            seen.add(key)
            acc = per_request.get(rid)
            if acc is None:
                acc = per_request[rid] = _Accumulator(start_ns=span.start_ns, end_ns=span.end_ns)
            acc.model = acc.model or span.model
            acc.tenant = acc.tenant or span.tenant
            acc.start_ns = min(acc.start_ns, span.start_ns)
            acc.end_ns = max(acc.end_ns, span.end_ns)
            acc.input_tokens += span.input_tokens
            acc.output_tokens += span.output_tokens
            acc.hosts.add(span.hostname)
            acc.computed += 1
            if measured[i]:
                acc.measured += 1
                acc.gpu_j += gpu[i]
                acc.cpu_j += cpu[i]
                acc.dram_j += dram[i]
                acc.idle_j += idle[i]
            if ready[i]:
                acc.ready += 1

    def _settle(
        self,
        now: int,
        taken: Sequence[str],
        pending: set[str],
        neighbours: set[str],
        per_request: dict[str, _Accumulator],
        full: bool,
    ) -> PassStats:
        grace_ns = int(self.config.finalize_grace_s * S)
        pue = self.config.pue
        results: list[RequestResult] = []
        firsts: list[RequestResult] = []
        revised = 0
        still_pending = 0
        for rid, acc in per_request.items():
            spans_total = acc.computed
            status: RequestStatus
            if acc.ready == spans_total and acc.measured == spans_total:
                status = "final"
            elif now >= acc.end_ns + grace_ns and rid in pending:
                status = "approximate" if acc.measured else "no_samples"
            else:
                if rid in pending:
                    still_pending += 1
                    self._back_off(rid, now, acc.end_ns + grace_ns)
                continue
            self._retry.pop(rid, None)
            energies: tuple[float | None, ...] = (None, None, None, None, None)
            if status != "no_samples":
                active = acc.gpu_j + acc.cpu_j + acc.dram_j
                energies = (active, (active + acc.idle_j) * pue, acc.gpu_j, acc.cpu_j, acc.dram_j)
            result = RequestResult(
                request_id=rid,
                status=status,
                model=acc.model,
                tenant=acc.tenant,
                hosts=tuple(sorted(acc.hosts)),
                start_ns=acc.start_ns,
                end_ns=acc.end_ns,
                input_tokens=acc.input_tokens,
                output_tokens=acc.output_tokens,
                active_j=energies[0],
                full_j=energies[1],
                gpu_j=energies[2],
                cpu_j=energies[3],
                dram_j=energies[4],
                spans=spans_total,
                updated_ns=now,
            )
            before = self._written.get(rid)
            if rid in neighbours:
                if status != "final":
                    continue  # a stored result is not replaced by a less complete one
                if before is not None and not (
                    before.status != status
                    or _differs(before.active_j, result.active_j)
                    or _differs(before.full_j, result.full_j)
                ):
                    continue
            if before is None:
                # first time (a neighbour too: pending when the pass began is not known of spans written since)
                firsts.append(result)
            elif rid in pending or before.status != status or _differs(before.active_j, result.active_j):
                revised += 1
            results.append(result)
        if results:
            self.store.write_request_results(results)
        for result in results:
            self._remember(result)
        for result in firsts:
            self.metrics.finished(result.model, result.tenant, result.active_j, result.full_j, result.output_tokens)
        if revised:
            self.metrics.revised(revised)
        self.metrics.set_pending(len(taken) - (len(pending) - still_pending))
        return PassStats(len(taken), len(results), len(firsts), revised, full)

    def _back_off(self, rid: str, now: int, deadline: int) -> None:
        if len(self._retry) > 10 * self.config.max_per_pass:
            self._retry.clear()  # requests another aggregator settled (a shared database) are never met again
        _, backoff = self._retry.get(rid, (0, 0))
        backoff = min(max(backoff * 2, S), MAX_RETRY_NS)
        self._retry[rid] = (min(now + backoff, deadline), backoff)

    def _remember(self, result: RequestResult) -> None:
        self._written[result.request_id] = _Written(result.status, result.active_j, result.full_j)
        self._written.move_to_end(result.request_id)
        while len(self._written) > REMEMBERED:
            self._written.popitem(last=False)
