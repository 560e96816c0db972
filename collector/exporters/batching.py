"""Columnar series for the telemetry stream, collected on the sampler's threads between two batches.

Device samples come from sampler listeners, workload samples from the tracker's split listener; both append to
one buffer under a short lock, and the flusher takes the buffer whole. A buffer whose estimated size reaches the
batch limit is sealed on the spot, so no batch outgrows ``max_batch_bytes`` however long the flusher is late.

Workload energy is each (workload, device)'s cumulative joules for the life of the agent, starting at 0. A sample
is written when the energy changed in that reading or in the previous one, and at the reading before a change, so
each flat stretch is pinned at both ends and the aggregator never spreads one reading's energy over a quiet minute.

Training steps (cumulative per workload, ``StepChanges``) and workload labels (``LabelChanges``) are read at each
flush and go with the next batches when they changed, and every few minutes again.

Request spans reported over the registration socket wait in a ``SpanQueue`` (at most ``MAX_PENDING_SPANS``; past
it they are dropped and counted) and go into the next batches, each batch taking what fits in its byte budget.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from collector.attribution import SpecialKey
from collector.proto import wattmeter_pb2 as pb
from collector.readings import DeviceKind, DeviceReading
from collector.registration import SpanEvent
from collector.sampler import Sampler
from collector.workloads.tracker import WorkloadKey, label_values

# Upper bounds of the encoded size, so the estimate never undershoots: a device sample is a fixed64 time and
# two doubles, a workload sample a fixed64 and a double (packed); a series adds its strings, tags and lengths.
DEVICE_SAMPLE_BYTES = 24
WORKLOAD_SAMPLE_BYTES = 16
SERIES_OVERHEAD_BYTES = 40
BINDING_OVERHEAD_BYTES = 24
# Room left in every batch for its header (host, instance id, sequence...) and process bindings.
BATCH_RESERVE_BYTES = 16 * 1024
# A span's field tag and length prefix in a batch: 1 byte of tag, at most 3 of length (a span is under 2**21 bytes).
SPAN_FRAMING_BYTES = 4
# A step point: a fixed64 time and a varint count (at most 10 bytes), packed.
STEP_POINT_BYTES = 18
STEPS_RESEND_S = 60.0
LABELS_RESEND_S = 300.0
MAX_STEP_POINTS = 3600  # per workload waiting for a batch: an hour of flushes
MAX_PENDING_SPANS = 100_000
"""Spans waiting for a batch; more are dropped and counted (about 20 MB at the largest spans the socket accepts)."""

WireKey = tuple[str, str, str]  # (workload, phase, job) as sent: special keys are ("idle" | "system" | "other", "", "")


@dataclass
class _DeviceState:
    """What the builder remembers of a device between batches."""

    source: str  # the sampler source that reads it
    kind: str
    device_source: str  # DeviceInfo.source
    in_host_total: bool
    offset_j: float = 0.0  # keeps the series continuous when another source takes the device over
    last_energy_j: float = 0.0
    last_time_ns: int = 0


@dataclass
class DeviceColumns:
    kind: str
    source: str
    in_host_total: bool
    time_ns: list[int] = field(default_factory=list)
    energy_j: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)  # NaN where the device gave none
    has_power: bool = False


@dataclass
class WorkloadColumns:
    time_ns: list[int] = field(default_factory=list)
    energy_j: list[float] = field(default_factory=list)


@dataclass
class _WorkloadCounter:
    wire_key: WireKey
    total_j: float = 0.0
    last_emitted_ns: int = -1


@dataclass
class SeriesBuffer:
    """The samples of one batch-to-be, by device and by (workload, device)."""

    devices: dict[str, DeviceColumns] = field(default_factory=dict)
    workloads: dict[tuple[WireKey, str], WorkloadColumns] = field(default_factory=dict)
    estimated_bytes: int = 0

    @property
    def empty(self) -> bool:
        return not self.devices and not self.workloads

    def to_proto(self) -> tuple[list[pb.DeviceSeries], list[pb.WorkloadSeries]]:
        devices = [
            pb.DeviceSeries(
                device_id=device_id,
                kind=columns.kind,
                source=columns.source,
                time_ns=columns.time_ns,
                energy_j=columns.energy_j,
                power_w=columns.power_w if columns.has_power else (),
                in_host_total=columns.in_host_total,
            )
            for device_id, columns in self.devices.items()
        ]
        workloads = [
            pb.WorkloadSeries(
                workload=pb.WorkloadIdentity(workload=key[0], phase=key[1], job=key[2]),
                device_id=device_id,
                time_ns=columns.time_ns,
                energy_j=columns.energy_j,
            )
            for (key, device_id), columns in self.workloads.items()
        ]
        return devices, workloads


class BatchBuilder:
    """Listens to the sampler (and the tracker's splits) and hands the flusher whole buffers."""

    def __init__(self, sampler: Sampler, max_batch_bytes: int) -> None:
        self.sampler = sampler
        self.cut_bytes = max(1, max_batch_bytes - BATCH_RESERVE_BYTES)
        self.cut = threading.Event()  # set when a full buffer was sealed: flush without waiting for the interval
        self._lock = threading.Lock()
        self._buffer = SeriesBuffer()
        self._sealed: list[SeriesBuffer] = []
        self._devices: dict[str, _DeviceState] = {}
        self._counters: dict[tuple[WorkloadKey | SpecialKey, str], _WorkloadCounter] = {}
        self._split_time_ns: dict[str, int] = {}  # device -> time of its last split reading
        self._changed_last: dict[str, set[WorkloadKey | SpecialKey]] = {}

    # --- device readings (sampler listener) ---------------------------------------------------------------------

    def _declare(self, source_name: str, reading: DeviceReading) -> _DeviceState:
        info = next(
            (
                i
                for st in self.sampler.states
                if st.name == source_name
                for i in st.devices
                if i.device_id == reading.device_id
            ),
            None,
        )
        kind = info.kind if info is not None else DeviceKind.GPU
        # host totals add devices up: leave out the parts of a package (core, uncore) and the platform (psys)
        in_host_total = kind is not DeviceKind.CPU or (info is not None and info.domain == "package")
        state = _DeviceState(source_name, kind.value, info.source if info else source_name, in_host_total)
        previous = self._devices.get(reading.device_id)
        if previous is not None:  # another source took the device over (RAPL after the estimate): no step back
            state.offset_j = previous.last_energy_j - reading.energy_j
            state.last_time_ns = previous.last_time_ns
        self._devices[reading.device_id] = state
        return state

    def on_readings(self, source_name: str, readings: Sequence[DeviceReading]) -> None:
        with self._lock:
            buffer = self._buffer
            added = 0
            for reading in readings:
                device_id = reading.device_id
                state = self._devices.get(device_id)
                if state is None or state.source != source_name:
                    state = self._declare(source_name, reading)
                if reading.time_ns <= state.last_time_ns:
                    continue  # the wall clock stepped back: the next sample after it carries the energy
                columns = buffer.devices.get(device_id)
                if columns is None:
                    columns = DeviceColumns(state.kind, state.device_source, state.in_host_total)
                    buffer.devices[device_id] = columns
                    added += SERIES_OVERHEAD_BYTES + len(device_id) + len(state.device_source)
                energy_j = reading.energy_j + state.offset_j
                state.last_energy_j = energy_j
                state.last_time_ns = reading.time_ns
                columns.time_ns.append(reading.time_ns)
                columns.energy_j.append(energy_j)
                if reading.power_w is None:
                    columns.power_w.append(math.nan)
                else:
                    columns.power_w.append(reading.power_w)
                    columns.has_power = True
                added += DEVICE_SAMPLE_BYTES
            buffer.estimated_bytes += added
            if buffer.estimated_bytes >= self.cut_bytes:
                self._seal()

    # --- workload energy (tracker split listener) ---------------------------------------------------------------

    def on_split(
        self, reading: DeviceReading, joules_by_key: Mapping[WorkloadKey | SpecialKey, float], in_host_total: bool
    ) -> None:
        device_id = reading.device_id
        time_ns = reading.time_ns
        with self._lock:
            previous_ns = self._split_time_ns.get(device_id)
            stepped_back = previous_ns is not None and time_ns <= previous_ns
            changed_before = self._changed_last.get(device_id, set())
            changed_now: set[WorkloadKey | SpecialKey] = set()
            for key, joules in joules_by_key.items():
                if joules == 0.0:
                    continue
                counter = self._counters.get((key, device_id))
                if counter is None:
                    counter = _WorkloadCounter(label_values(key))
                    self._counters[(key, device_id)] = counter
                if stepped_back:
                    counter.total_j += joules  # written with the next sample that moves forward in time
                    continue
                if previous_ns is not None and counter.last_emitted_ns < previous_ns:
                    self._emit(counter, device_id, previous_ns)  # the end of a flat stretch (0 for a new series)
                counter.total_j += joules
                self._emit(counter, device_id, time_ns)
                changed_now.add(key)
            if stepped_back:
                return
            for key in changed_before - changed_now:
                self._emit(self._counters[(key, device_id)], device_id, time_ns)  # the start of a flat stretch
            self._changed_last[device_id] = changed_now
            self._split_time_ns[device_id] = time_ns
            if self._buffer.estimated_bytes >= self.cut_bytes:
                self._seal()

    def _emit(self, counter: _WorkloadCounter, device_id: str, time_ns: int) -> None:
        buffer = self._buffer
        series_key = (counter.wire_key, device_id)
        columns = buffer.workloads.get(series_key)
        if columns is None:
            columns = WorkloadColumns()
            buffer.workloads[series_key] = columns
            buffer.estimated_bytes += SERIES_OVERHEAD_BYTES + sum(map(len, counter.wire_key)) + len(device_id)
        columns.time_ns.append(time_ns)
        columns.energy_j.append(counter.total_j)
        counter.last_emitted_ns = time_ns
        buffer.estimated_bytes += WORKLOAD_SAMPLE_BYTES

    # --- the flusher's side ---------------------------------------------------------------------------------------

    def _seal(self) -> None:
        self._sealed.append(self._buffer)
        self._buffer = SeriesBuffer()
        self.cut.set()

    def take(self) -> list[SeriesBuffer]:
        """Every sealed buffer, then the current one if it holds anything; the builder starts a new one."""
        with self._lock:
            taken = self._sealed
            self._sealed = []
            if not self._buffer.empty:
                taken.append(self._buffer)
                self._buffer = SeriesBuffer()
            self.cut.clear()
        return taken


class BindingChanges:
    """Which pid -> workload bindings the aggregator has not heard of yet: new or changed pids only."""

    def __init__(self) -> None:
        self._known: dict[int, WireKey] = {}
        self._pending: dict[int, WireKey] = {}

    def update(self, current: Mapping[int, WorkloadKey]) -> None:
        """Take the live bindings now; a pid that is gone is simply forgotten."""
        self._pending = {pid: key for pid, key in self._pending.items() if current.get(pid) == key}
        for pid, key in current.items():
            if self._known.get(pid) != key:
                self._pending[pid] = key
        self._known = dict(current)

    def take(self, budget_bytes: int) -> list[pb.ProcessBinding]:
        """Pending bindings that fit in ``budget_bytes``; the rest wait for the next batch."""
        taken: list[pb.ProcessBinding] = []
        for pid, key in list(self._pending.items()):
            cost = BINDING_OVERHEAD_BYTES + sum(map(len, key))
            if cost > budget_bytes:
                break
            budget_bytes -= cost
            taken.append(
                pb.ProcessBinding(pid=pid, workload=pb.WorkloadIdentity(workload=key[0], phase=key[1], job=key[2]))
            )
            del self._pending[pid]
        return taken

    @property
    def pending(self) -> int:
        return len(self._pending)


def _identity(key: WireKey) -> pb.WorkloadIdentity:
    return pb.WorkloadIdentity(workload=key[0], phase=key[1], job=key[2])


class StepChanges:
    """Cumulative steps per workload (``WorkloadSteps.totals``) for the next batches: a point for each workload
    whose count moved since the last batch took one, and for every workload every ``resend_s`` (so a batch the
    aggregator refused, with the last point in it, costs nothing once the next resend is stored). Points that do not
    fit in a batch's budget wait for the next; at most ``MAX_STEP_POINTS`` per workload wait (the oldest go: the
    counts are cumulative, so only when the steps were done is lost, never a step)."""

    def __init__(self, resend_s: float = STEPS_RESEND_S) -> None:
        self.resend_s = resend_s
        self._sent: dict[WireKey, int] = {}
        self._pending: dict[WireKey, tuple[list[int], list[int]]] = {}
        self._resent_s: float | None = None

    def update(self, totals: Mapping[WireKey, int], time_ns: int, now_s: float) -> None:
        """Take the counts as they stand at ``time_ns`` (Unix ns); ``now_s``: monotonic seconds, for resends."""
        resend = self._resent_s is None or now_s - self._resent_s >= self.resend_s
        if resend:
            self._resent_s = now_s
        for key, count in totals.items():
            if not resend and self._sent.get(key) == count:
                continue
            self._sent[key] = count
            times, counts = self._pending.setdefault(key, ([], []))
            if times and times[-1] >= time_ns:  # the wall clock stepped back: the latest point takes the count
                counts[-1] = count
                continue
            times.append(time_ns)
            counts.append(count)
            if len(times) > MAX_STEP_POINTS:
                del times[0], counts[0]
        for key in [key for key in self._sent if key not in totals]:  # expired on the agent: starts again at 0
            del self._sent[key]

    def take(self, budget_bytes: int) -> list[pb.StepSeries]:
        """Pending series that fit in ``budget_bytes``; the rest wait for the next batch."""
        taken: list[pb.StepSeries] = []
        for key, (times, counts) in list(self._pending.items()):
            cost = SERIES_OVERHEAD_BYTES + sum(map(len, key)) + STEP_POINT_BYTES * len(times)
            if cost > budget_bytes:
                break
            budget_bytes -= cost
            taken.append(pb.StepSeries(workload=_identity(key), time_ns=times, count=counts))
            del self._pending[key]
        return taken

    @property
    def pending(self) -> int:
        return len(self._pending)


class LabelChanges:
    """Each workload's registration labels for the next batches: the whole set of a workload whose labels are new
    or changed, and every workload's every ``resend_s``, so an aggregator that lost them learns them again. A
    workload whose labels went (its last labelled process re-registered without them) is sent with none."""

    def __init__(self, resend_s: float = LABELS_RESEND_S) -> None:
        self.resend_s = resend_s
        self._known: dict[WireKey, tuple[tuple[str, str], ...]] = {}
        self._pending: dict[WireKey, tuple[tuple[str, str], ...]] = {}
        self._resent_s: float | None = None

    def update(self, current: Mapping[WireKey, tuple[tuple[str, str], ...]], now_s: float) -> None:
        """``current``: the labels of the workloads the agent knows now (a workload it forgot is not withdrawn)."""
        resend = self._resent_s is None or now_s - self._resent_s >= self.resend_s
        if resend:
            self._resent_s = now_s
        for key, labels in current.items():
            if labels != self._known.get(key, ()) or (resend and labels):
                self._pending[key] = labels
            self._known[key] = labels
        for key in [key for key in self._known if key not in current]:
            del self._known[key]

    def take(self, budget_bytes: int) -> list[pb.WorkloadLabels]:
        taken: list[pb.WorkloadLabels] = []
        for key, labels in list(self._pending.items()):
            cost = SERIES_OVERHEAD_BYTES + sum(map(len, key)) + sum(len(k) + len(v) + 8 for k, v in labels)
            if cost > budget_bytes:
                break
            budget_bytes -= cost
            taken.append(pb.WorkloadLabels(workload=_identity(key), labels=dict(labels)))
            del self._pending[key]
        return taken

    @property
    def pending(self) -> int:
        return len(self._pending)


def span_message(event: SpanEvent) -> pb.RequestSpan:
    """The span as it goes in a batch: ``hostname`` left empty (the batch's host), the pid from ``SO_PEERCRED``."""
    return pb.RequestSpan(
        request_id=event.request_id,
        start_ns=event.start_ns,
        end_ns=event.end_ns,
        workload=event.workload,
        pid=event.pid,
        model=event.model,
        tenant=event.tenant,
        labels=dict(event.labels),
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        prefill_end_ns=event.prefill_end_ns,
        queue_end_ns=event.queue_end_ns,
        span_id=event.span_id,
    )


class SpanQueue:
    """Spans waiting for the next batches, bounded by ``max_pending``; ``cut`` is set once a batch's worth waits, so
    the flusher need not wait for the interval. ``add`` runs on the registration thread, ``take`` on the flusher."""

    def __init__(self, cut: threading.Event, cut_bytes: int, max_pending: int = MAX_PENDING_SPANS) -> None:
        self.cut = cut
        self.cut_bytes = cut_bytes
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._spans: deque[tuple[pb.RequestSpan, int]] = deque()  # (span, its bytes in a batch)
        self._bytes = 0
        self.dropped = 0
        """Spans refused because ``max_pending`` were already waiting."""

    def add(self, span: pb.RequestSpan) -> bool:
        """Queue ``span``; False (and counted in ``dropped``) when the queue is full."""
        size = span.ByteSize() + SPAN_FRAMING_BYTES
        with self._lock:
            if len(self._spans) >= self.max_pending:
                self.dropped += 1
                return False
            self._spans.append((span, size))
            self._bytes += size
            full = self._bytes >= self.cut_bytes
        if full:
            self.cut.set()
        return True

    def take(self, budget_bytes: int, max_count: int | None = None) -> tuple[list[pb.RequestSpan], int]:
        """The oldest spans that fit in ``budget_bytes`` (at most ``max_count``), and the bytes they take."""
        taken: list[pb.RequestSpan] = []
        used = 0
        with self._lock:
            spans = self._spans
            while spans and (max_count is None or len(taken) < max_count):
                span, size = spans[0]
                if used + size > budget_bytes:
                    break
                spans.popleft()
                taken.append(span)
                used += size
            self._bytes -= used
        return taken, used

    @property
    def pending(self) -> int:
        return len(self._spans)
