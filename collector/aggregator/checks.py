"""What can be checked and worked out of one batch from its bytes and the time it came: every rule that does not
need the agent instance's history (``rules``: where each falls among those that do), the sample columns, power, the
rollups of the steps inside the batch, and the rows to store (packed from the wire bytes as they are).

``check`` is pure but for caches that change nothing it returns: it runs in the aggregator's worker processes
(``processes``) or on its event loop, batches in any order. What needs the history (the watermark, the previous
batch's last samples, devices sent before) is done by ``ingest``, which orders each instance's batches.
"""

from __future__ import annotations

import marshal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from collector.aggregator import columns, wire
from collector.aggregator.columns import Columns, InvalidBatch
from collector.aggregator.rules import (
    PHASES,
    PROTOCOL_MAJOR,
    SPECIAL_WORKLOADS,
    STAGE_HEADER,
    STAGE_POWER,
    STAGE_SAMPLES,
    GarbageBatch,
    NewerProtocol,
    Refusal,
    Refused,
    name_error,
    too_many_samples,
    where_device,
    where_workload,
)
from collector.aggregator.shape import SeriesKey, Shape, Shapes
from collector.aggregator.spans import binding_error, binding_row, span_error, span_row
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import (
    Float64Array,
    HostInfo,
    Int64Array,
    ProcessBindingRow,
    SpanRow,
    StepSeriesRow,
    WorkloadLabelsRow,
)
from collector.store.rows import DeviceChunkRow, PackedBatch, RollupRow, WorkloadChunkRow, WorkloadKey

_shapes = Shapes()
# Training steps and workload labels: an agent sends a point per stepping workload per second and each workload's
# labels when they change, so these bound garbage, not real use (an agent keeps at most 3,600 points a workload).
MAX_STEP_SERIES = 4096
MAX_STEP_POINTS = 4096  # in one series
MAX_STEP_COUNT = 2**62  # a cumulative count; sums of its differences stay in a 64-bit integer column
MAX_LABEL_SETS = 4096
MAX_WORKLOAD_LABELS = 64  # labels of one workload (the registration socket takes 16)
MAX_LABEL_TEXT = 256


@dataclass(frozen=True)
class Limits:
    max_future_s: float
    max_batch_samples: int


@dataclass
class Checked:
    """One batch as far as its bytes tell. ``unplaceable``: it names no instance or sequence (refused, recorded
    nowhere); ``refusal``: the first rule it breaks here. Else ``rows`` is what to store, less each series' first
    sample's step from the instance's last stored one: that step goes into ``rows.rollups[first_rollup[i]]``.

    Series ``i`` (those with samples, devices first: ``devices_with_samples`` of them) is ``keys[i]``, at
    ``positions[i]`` in batch.devices or batch.workloads, with its first and last sample. The first samples are
    there for a refusal at STAGE_POWER too (the continuity checks come first)."""

    instance_id: str
    sequence: int
    oldest_pending_sequence: int
    host: HostInfo
    received_ns: int
    size: int
    unplaceable: str | None = None
    refusal: Refusal | None = None
    lookups: list[tuple[str, str]] = field(default_factory=list)  # (device, where): see Shape.lookups
    samples: int = 0
    devices: dict[str, bool] = field(default_factory=dict)  # device_id -> in_host_total, of this batch
    keys: list[SeriesKey] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    devices_with_samples: int = 0
    first_time_ns: list[int] = field(default_factory=list)
    first_energy_j: list[float] = field(default_factory=list)
    last_time_ns: list[int] = field(default_factory=list)
    last_energy_j: list[float] = field(default_factory=list)
    first_rollup: list[int] = field(default_factory=list)
    rows: PackedBatch | None = None
    power: dict[str, float] = field(default_factory=dict)  # in_host_total device -> latest W
    dropped: list[str] = field(default_factory=list)  # optional fields dropped (counted once stored)
    notes: list[str] = field(default_factory=list)  # what to log (info) once stored
    spans: list[SpanRow] = field(default_factory=list)  # valid ones (hostname filled in, span_id derived if none)
    rejected_spans: int = 0
    bindings: list[ProcessBindingRow] = field(default_factory=list)
    steps: list[StepSeriesRow] = field(default_factory=list)  # valid ones
    labels: list[WorkloadLabelsRow] = field(default_factory=list)

    def where(self, series: int) -> str:
        device_id, identity = self.keys[series]
        if identity is None:
            return where_device(self.positions[series], device_id)
        return where_workload(self.positions[series], device_id, *identity)


def to_wire(checked: Checked) -> bytes:
    """``checked`` as bytes for ``from_wire`` in another process of this same program (marshal: primitives only,
    several times faster than pickling the dataclasses)."""
    rows = checked.rows
    refusal = checked.refusal
    return marshal.dumps(
        (
            checked.instance_id,
            checked.sequence,
            checked.oldest_pending_sequence,
            (checked.host.hostname, checked.host.machine_id, checked.host.boot_id),
            checked.received_ns,
            checked.size,
            checked.unplaceable,
            None if refusal is None else (refusal.stage, refusal.index, refusal.message),
            checked.lookups,
            checked.samples,
            checked.devices,
            checked.keys,
            checked.positions,
            checked.devices_with_samples,
            checked.first_time_ns,
            checked.first_energy_j,
            checked.last_time_ns,
            checked.last_energy_j,
            checked.first_rollup,
            None
            if rows is None
            else (rows.devices, rows.device_chunks, rows.workload_chunks, rows.rollups, rows.workloads),
            checked.power,
            checked.dropped,
            checked.notes,
            [_span_tuple(span) for span in checked.spans],
            checked.rejected_spans,
            [(b.hostname, b.pid, b.workload, b.phase, b.job, b.seen_ns) for b in checked.bindings],
            [(s.workload, s.phase, s.job, s.time_ns, s.count) for s in checked.steps],
            [(w.workload, w.phase, w.job, w.labels, w.seen_ns) for w in checked.labels],
        )
    )


def from_wire(data: bytes) -> Checked:
    (instance_id, sequence, oldest_pending, host, received_ns, size, unplaceable, refusal, lookups, samples, devices,
     keys, positions, devices_with_samples, first_time, first_energy, last_time, last_energy, first_rollup, rows,
     power, dropped, notes, spans, rejected_spans, bindings, steps, labels) = marshal.loads(data)  # fmt: skip
    return Checked(
        instance_id,
        sequence,
        oldest_pending,
        HostInfo(*host),
        received_ns,
        size,
        unplaceable,
        None if refusal is None else Refusal(*refusal),
        lookups,
        samples,
        devices,
        keys,
        positions,
        devices_with_samples,
        first_time,
        first_energy,
        last_time,
        last_energy,
        first_rollup,
        None if rows is None else PackedBatch(*rows),
        power,
        dropped,
        notes,
        [SpanRow(*span) for span in spans],
        rejected_spans,
        [ProcessBindingRow(*binding) for binding in bindings],
        [StepSeriesRow(*series) for series in steps],
        [WorkloadLabelsRow(*labels_row) for labels_row in labels],
    )


def _span_tuple(span: SpanRow) -> tuple[object, ...]:
    """``span``'s fields in order (what ``SpanRow(*fields)`` takes back); dataclasses.astuple deep-copies, slowly."""
    return (span.request_id, span.span_id, span.hostname, span.start_ns, span.end_ns, span.workload, span.pid,
            span.service_name, span.model, span.tenant, span.input_tokens, span.output_tokens, span.queue_end_ns,
            span.prefill_end_ns, span.labels, span.received_ns)  # fmt: skip


def parse_batch(data: bytes) -> pb.Batch:
    batch = pb.Batch()
    try:
        batch.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise GarbageBatch(
            f"{len(data)} bytes that are not a wattmeter.v1.Batch ({exc}); is the client a wattmeter agent?"
        ) from None
    return batch


def check(data: bytes, received_ns: int, limits: Limits) -> Checked:
    """Parse and check ``data``, received at ``received_ns``. Raises ``GarbageBatch`` or ``NewerProtocol``."""
    batch = parse_batch(data)
    if batch.protocol_major > PROTOCOL_MAJOR:
        raise NewerProtocol(
            f"batch protocol_major {batch.protocol_major} is newer than this aggregator's {PROTOCOL_MAJOR}: "
            "upgrade the aggregator"
        )
    header = batch.host
    checked = Checked(
        batch.agent_instance_id,
        batch.sequence,
        batch.oldest_pending_sequence,
        HostInfo(header.hostname, header.machine_id, header.boot_id),
        received_ns,
        len(data),
    )
    checked.unplaceable = name_error("agent_instance_id", checked.instance_id) or (
        "sequence is 0 (sequences start at 1)" if checked.sequence == 0 else None
    )
    if checked.unplaceable is None:
        try:
            _check(batch, data, limits, checked)
        except Refused as refused:
            checked.refusal = refused.refusal
            checked.rows = None
            if refused.lookups:
                checked.lookups = refused.lookups
    return checked


def _header_error(batch: pb.Batch, host: HostInfo) -> str | None:
    if batch.protocol_major == 0:
        return "protocol_major is 0 (not set): this aggregator speaks 1"
    if batch.oldest_pending_sequence > batch.sequence:
        return f"oldest_pending_sequence {batch.oldest_pending_sequence} is above sequence {batch.sequence}"
    return (
        name_error("host.hostname", host.hostname)
        or name_error("host.machine_id", host.machine_id, required=False)
        or name_error("host.boot_id", host.boot_id, required=False)
    )


def _shape(batch: pb.Batch, data: bytes, limits: Limits, instance_id: str) -> tuple[Shape, wire.Layout | None]:
    known = _shapes.find(instance_id, data)
    if known is not None:
        return known
    spans = wire.spans(data)
    layout = None if spans is None else wire.scan(data, spans)
    if layout is not None and (
        len(layout.devices) != len(batch.devices) or len(layout.workloads) != len(batch.workloads)
    ):
        layout = None  # cannot be (the scan reads what protobuf parsed): read the parsed message
    shape = Shape.of(batch, layout, limits.max_batch_samples)
    if spans is not None and layout is not None:
        _shapes.keep(instance_id, data, spans, layout, shape)
    return shape, layout


def _check(batch: pb.Batch, data: bytes, limits: Limits, checked: Checked) -> None:
    header_error = _header_error(batch, checked.host)
    if header_error is not None:
        raise Refused(STAGE_HEADER, header_error)
    shape, layout = _shape(batch, data, limits, checked.instance_id)
    if shape.samples > limits.max_batch_samples:  # a shape kept under another limit
        raise Refused(STAGE_HEADER, too_many_samples(shape.samples, limits.max_batch_samples))
    checked.samples = shape.samples
    checked.devices = shape.devices
    checked.lookups = shape.lookups
    latest_ns = checked.received_ns + int(limits.max_future_s * 1e9)
    device_values = _Values.read(data, None if layout is None else layout.devices, batch.devices, shape.whole)
    workload_values = _Values.read(data, None if layout is None else layout.workloads, batch.workloads, shape.whole)
    try:
        if shape.device_count_error is not None:
            raise InvalidBatch(shape.device_count_error)
        device_columns = columns.check(
            shape.device_segments, device_values.times, device_values.energy, lambda i: shape.where(False, i), latest_ns
        )
        if shape.workload_count_error is not None:
            raise InvalidBatch(shape.workload_count_error)
        workload_columns = columns.check(
            shape.workload_segments,
            workload_values.times,
            workload_values.energy,
            lambda i: shape.where(True, i),
            latest_ns,
        )
    except InvalidBatch as exc:
        raise Refused(STAGE_SAMPLES, str(exc)) from None
    # both kinds as one (devices first): their series are numbered so in the shape
    time_ns = np.concatenate((device_columns.time_ns, workload_columns.time_ns))
    energy_j = np.concatenate((device_columns.energy_j, workload_columns.energy_j))
    _ends(checked, shape, time_ns, energy_j)
    if shape.power_count_error is not None:
        raise Refused(STAGE_POWER, shape.power_count_error)
    power = _power(data, layout, batch, shape, checked)
    checked.rows = _rows(checked, shape, columns.Columns(shape.segments, time_ns, energy_j), device_values,
                         workload_values, power)  # fmt: skip
    if batch.spans:
        checked.spans, checked.rejected_spans = _spans(batch, checked, latest_ns)
    if batch.processes:
        checked.bindings = _bindings(batch, checked, latest_ns)
    if batch.steps:
        checked.steps = _steps(batch, checked, latest_ns)
    if batch.labels:
        checked.labels = _labels(batch, checked, latest_ns)


@dataclass(frozen=True)
class _Values:
    """One kind of series joined (times as sent), and each series' arrays as stored."""

    times: columns.UInt64Array
    energy: Float64Array
    time_blobs: list[bytes]  # per series, as stored (empty unless every count matches)
    energy_blobs: list[bytes]

    @classmethod
    def read(
        cls,
        data: bytes,
        ranges: list[wire.Ranges] | None,
        series: Sequence[pb.DeviceSeries] | Sequence[pb.WorkloadSeries],
        whole: bool,
    ) -> _Values:
        if ranges is not None:
            sent_times = [data[r[0] : r[1]] for r in ranges]
            sent_energy = [data[r[2] : r[3]] for r in ranges]
            return cls(
                np.frombuffer(b"".join(sent_times), dtype="<u8").astype(np.uint64, copy=False),
                np.frombuffer(b"".join(sent_energy), dtype="<f8").astype(np.float64, copy=False),
                sent_times,
                sent_energy,
            )
        times = np.array([t for s in series for t in s.time_ns], dtype=np.uint64)
        energy = np.array([e for s in series for e in s.energy_j], dtype=np.float64)
        time_blobs: list[bytes] = []
        energy_blobs: list[bytes] = []
        if whole:
            start = 0
            for one in series:
                end = start + len(one.time_ns)
                time_blobs.append(times[start:end].astype("<u8").tobytes())
                energy_blobs.append(energy[start:end].astype("<f8").tobytes())
                start = end
        return cls(times, energy, time_blobs, energy_blobs)


def _ends(checked: Checked, shape: Shape, time_ns: Int64Array, energy_j: Float64Array) -> None:
    """Each series' first and last sample into ``checked``."""
    segments = shape.segments
    checked.keys = shape.present_keys
    checked.positions = shape.present_positions
    checked.devices_with_samples = shape.devices_with_samples
    checked.first_time_ns = time_ns[segments.firsts].tolist()
    checked.first_energy_j = energy_j[segments.firsts].tolist()
    checked.last_time_ns = time_ns[segments.lasts].tolist()
    checked.last_energy_j = energy_j[segments.lasts].tolist()


def _power(
    data: bytes, layout: wire.Layout | None, batch: pb.Batch, shape: Shape, checked: Checked
) -> list[bytes | None]:
    """Each device's power array to store (None: none sent, or dropped: negative or infinite values); the latest
    measured power of in_host_total devices into ``checked.power``."""
    if layout is not None:
        sent = [data[r[4] : r[5]] for r in layout.devices]
    else:
        sent = [np.array(s.power_w, dtype=np.float64).astype("<f8").tobytes() for s in batch.devices]
    out: list[bytes | None] = [blob or None for blob in sent]
    if not any(shape.power_counts):
        return out
    values = np.frombuffer(b"".join(sent), dtype="<f8")
    missing = np.isnan(values)
    bad = np.isinf(values) | (values < 0)
    bad_before = [0, *np.cumsum(bad).tolist()]
    # the position of the latest measured value at or before each position
    latest = np.maximum.accumulate(np.where(missing, -1, np.arange(len(values)))).tolist()
    listed = values.tolist()
    start = 0
    for index, count in enumerate(shape.power_counts):
        if not count:
            continue
        end = start + count
        device_id = shape.device_ids[index]
        if bad_before[end] != bad_before[start]:
            # power is a side reading: the energy counter is the measurement, so keep it and drop the power
            checked.notes.append(f"devices[{index}] ({device_id}): power_w negative or infinite, dropped")
            checked.dropped.append("power_w")
            out[index] = None
        elif shape.devices[device_id] and latest[end - 1] >= start:
            checked.power[device_id] = listed[latest[end - 1]]
        start = end
    return out


def _rows(
    checked: Checked,
    shape: Shape,
    joined: Columns,
    device_values: _Values,
    workload_values: _Values,
    power: list[bytes | None],
) -> PackedBatch:
    """The rows to store; where each series' first minute is in the rollups into ``checked.first_rollup``."""
    series, minutes, joules = columns.minute_arrays(joined, columns.within_deltas(joined))
    # rollup rows in the order of their buckets: (minute, device, workload)
    order = np.lexsort((shape.ranks[series], minutes))
    ordered = series[order]
    rollups: list[RollupRow] = list(
        zip(
            minutes[order].tolist(),
            shape.bucket_devices[ordered].tolist(),
            shape.bucket_keys[ordered].tolist(),
            joules[order].tolist(),
            strict=True,
        )
    )
    place = np.empty_like(order)
    place[order] = np.arange(len(order))
    # a series' rows come out of minute_arrays first minute first, series by series
    checked.first_rollup = place[np.searchsorted(series, shape.present_numbers)].tolist()

    sequence = [checked.sequence] * len(shape.present_numbers)
    count = shape.devices_with_samples
    present = shape.present_devices
    if len(present) == len(device_values.time_blobs):
        time_blobs, energy_blobs, power_blobs = device_values.time_blobs, device_values.energy_blobs, power
    else:
        time_blobs = [device_values.time_blobs[i] for i in present]
        energy_blobs = [device_values.energy_blobs[i] for i in present]
        power_blobs = [power[i] for i in present]
    device_chunks: list[DeviceChunkRow] = list(
        zip(
            [shape.device_ids[i] for i in present],
            checked.first_time_ns[:count],
            checked.last_time_ns[:count],
            sequence[:count],
            time_blobs,
            energy_blobs,
            power_blobs,
            strict=True,
        )
    )
    present = shape.present_workloads
    if len(present) == len(workload_values.time_blobs):
        time_blobs, energy_blobs = workload_values.time_blobs, workload_values.energy_blobs
    else:
        time_blobs = [workload_values.time_blobs[i] for i in present]
        energy_blobs = [workload_values.energy_blobs[i] for i in present]
    workload_chunks: list[tuple[WorkloadKey, WorkloadChunkRow]] = list(
        zip(
            [shape.identities[i] for i in present],
            zip(
                [shape.workload_devices[i] for i in present],
                checked.first_time_ns[count:],
                checked.last_time_ns[count:],
                sequence[count:],
                time_blobs,
                energy_blobs,
                strict=True,
            ),
            strict=True,
        )
    )
    return PackedBatch(shape.device_rows, device_chunks, workload_chunks, rollups, shape.workload_keys)


def _spans(batch: pb.Batch, checked: Checked, latest_ns: int) -> tuple[list[SpanRow], int]:
    hostname = checked.host.hostname
    accepted: list[SpanRow] = []
    rejected = 0
    for span in batch.spans:
        span_host = span.hostname or hostname
        if span_host != hostname:
            error: str | None = f"request {span.request_id[:64]!r}: hostname {span_host[:64]!r} is not the batch's host"
        else:
            error = span_error(span, span_host, latest_ns)
        if error is None:
            accepted.append(span_row(span, span_host, checked.received_ns))
        else:
            rejected += 1
            checked.notes.append(f"dropped a span from {hostname}: {error}")
    return accepted, rejected


def _bindings(batch: pb.Batch, checked: Checked, latest_ns: int) -> list[ProcessBindingRow]:
    """The batch's pid -> workload bindings, seen when the agent made the batch (a batch replayed from the spool
    keeps its time); at its arrival when that time is unset or in the future."""
    hostname = checked.host.hostname
    seen_ns = _seen_ns(batch, checked, latest_ns)
    accepted: list[ProcessBindingRow] = []
    for binding in batch.processes:
        error = binding_error(binding)
        if error is None:
            accepted.append(binding_row(binding, hostname, seen_ns))
        else:
            checked.notes.append(f"dropped a process binding from {hostname}: {error}")
            checked.dropped.append("process_binding")
    return accepted


def _seen_ns(batch: pb.Batch, checked: Checked, latest_ns: int) -> int:
    """When the agent made the batch (a batch replayed from the spool keeps its time); its arrival when that time
    is unset or in the future."""
    return batch.created_ns if 0 < batch.created_ns <= latest_ns else checked.received_ns


def identity_error(identity: pb.WorkloadIdentity) -> str | None:
    """Why a workload identity of a steps series or a label set is unusable; None when it is usable."""
    error = name_error("workload", identity.workload) or name_error("job", identity.job, required=False)
    if error is not None:
        return error
    phase = identity.phase
    if phase == "" and identity.workload not in SPECIAL_WORKLOADS:
        return "phase is empty, which only idle, system and other may have"
    if phase != "" and phase not in PHASES:
        return f"unknown phase {phase[:64]!r} (training, inference or unknown)"
    return None


def steps_error(series: pb.StepSeries, latest_ns: int) -> str | None:
    """Why a steps series is unusable; None when it is usable."""
    error = identity_error(series.workload)
    if error is not None:
        return error
    times, counts = series.time_ns, series.count
    if len(times) != len(counts):
        return f"{len(times)} time_ns but {len(counts)} count values"
    if not times:
        return "no points"
    if len(times) > MAX_STEP_POINTS:
        return f"{len(times)} points, more than {MAX_STEP_POINTS}"
    previous = 0
    for t in times:
        if t <= previous:
            return f"time_ns {t} is not after the point before it (0 is no time)"
        previous = t
    if previous > latest_ns:
        return f"time_ns {previous} is in the future (clock skew?)"
    if max(counts) > MAX_STEP_COUNT:
        return f"count {max(counts)} is more than {MAX_STEP_COUNT} (a counter error)"
    return None


def _steps(batch: pb.Batch, checked: Checked, latest_ns: int) -> list[StepSeriesRow]:
    """The batch's valid steps series; an invalid one (or one past ``MAX_STEP_SERIES``) is dropped and counted,
    and the rest of the batch stored."""
    valid = _one_per_workload(
        batch.steps, "steps", "steps series", MAX_STEP_SERIES, lambda s: steps_error(s, latest_ns), checked, "steps"
    )
    return [StepSeriesRow(*key, tuple(series.time_ns), tuple(series.count)) for key, series in valid]


_PerWorkload = TypeVar("_PerWorkload", pb.StepSeries, pb.WorkloadLabels)


def _one_per_workload(
    items: Sequence[_PerWorkload],
    name: str,
    plural: str,
    limit: int,
    error_of: Callable[[_PerWorkload], str | None],
    checked: Checked,
    dropped: str,
) -> list[tuple[tuple[str, str, str], _PerWorkload]]:
    """(workload key, item) of the batch's valid ``name`` items: at most ``limit``, one per workload, each without
    an ``error_of``; the others are dropped, noted and counted as ``dropped``."""
    accepted: list[tuple[tuple[str, str, str], _PerWorkload]] = []
    seen: set[tuple[str, str, str]] = set()
    for index, item in enumerate(items):
        identity = item.workload
        key = (identity.workload, identity.phase, identity.job)
        if index >= limit:
            error: str | None = f"more than {limit} {plural} in one batch"
        elif key in seen:
            error = f"the workload's {name} appear twice in the batch"
        else:
            error = error_of(item)
        if error is None:
            seen.add(key)
            accepted.append((key, item))
        else:
            where = f"{name}[{index}] ({identity.workload[:64]}/{identity.phase[:64]}/{identity.job[:64]})"
            checked.notes.append(f"dropped {where} from {checked.host.hostname}: {error}")
            checked.dropped.append(dropped)
    return accepted


def labels_error(labels: pb.WorkloadLabels) -> str | None:
    """Why a workload's label set is unusable; None when it is usable."""
    error = identity_error(labels.workload)
    if error is not None:
        return error
    if len(labels.labels) > MAX_WORKLOAD_LABELS:
        return f"{len(labels.labels)} labels, more than {MAX_WORKLOAD_LABELS}"
    for name, value in labels.labels.items():
        if not name:
            return "a label name is empty"
        if len(name) > MAX_LABEL_TEXT:
            return f"label name {name[:64]!r}... is longer than {MAX_LABEL_TEXT} characters"
        if _has_control(name):
            return f"label name {name[:64]!r} has control characters"
        if len(value) > MAX_LABEL_TEXT:
            return f"label {name!r}: the value is longer than {MAX_LABEL_TEXT} characters"
        if "\0" in value:
            return f"label {name!r}: the value holds NUL"
    return None


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _labels(batch: pb.Batch, checked: Checked, latest_ns: int) -> list[WorkloadLabelsRow]:
    """The batch's valid label sets, seen when the agent made the batch; an invalid one is dropped and counted."""
    seen_ns = _seen_ns(batch, checked, latest_ns)
    valid = _one_per_workload(
        batch.labels, "labels", "label sets", MAX_LABEL_SETS, labels_error, checked, "workload_labels"
    )
    return [WorkloadLabelsRow(*key, dict(labels.labels), seen_ns) for key, labels in valid]
