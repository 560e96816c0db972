"""What can be checked and worked out of one batch from its bytes and the time it came: every rule that does not
need the agent instance's history, the joined sample columns, power, the rollups of the steps inside the batch, and
the rows to store (packed from the wire bytes as they are).

``check`` is pure: it runs in the aggregator's worker processes (``checker``) or in the aggregator itself, batches in
any order. What needs the history (the watermark, the previous batch's last samples, devices sent before) is done
by ``ingest``, which orders each instance's batches; ``Refusal.stage`` says where a refusal found here falls among
those checks, so a batch is refused with the same first reason as when everything ran in one pass:

1. ``STAGE_HEADER``: the header, the size, the devices;
2. ``STAGE_WORKLOAD``: workload ``index``'s names and phase, a series sent twice, in turn with each workload's
   device being known (in the batch or sent before by the instance: history);
3. ``STAGE_SAMPLES``: the samples (times, counters); then each series' first sample against the instance's last
   stored one (history);
4. ``STAGE_POWER``: the power arrays' lengths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from collector.aggregator import columns, wire
from collector.aggregator.columns import Columns, InvalidBatch
from collector.aggregator.spans import ReceivedSpan, span_error
from collector.errors import WattmeterError
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import Float64Array, HostInfo
from collector.store.rows import DeviceChunkRow, PackedBatch, RollupRow, WorkloadChunkRow, WorkloadKey

PROTOCOL_MAJOR = 1
DEVICE_KINDS = frozenset({"gpu", "cpu", "dram"})
PHASES = frozenset({"training", "inference", "unknown"})
SPECIAL_WORKLOADS = frozenset({"idle", "system", "other"})  # sent with phase ""
MAX_NAME = 256  # characters in a hostname, id or workload name
MAX_VALID_NAMES = 65_536  # names remembered as checked (a fleet's hosts, devices and workloads)
DEVICE_KEY: WorkloadKey = ("", "", "")  # a device's own energy in rollups

STAGE_HEADER = 1
STAGE_WORKLOAD = 2
STAGE_SAMPLES = 3
STAGE_POWER = 4

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_valid_names: set[str] = set()
SeriesKey = tuple[str, tuple[str, str, str] | None]  # (device_id, workload identity or None for the device)


class StreamRefused(WattmeterError):
    """The stream cannot go on (not one bad batch): the gRPC server ends it with a status code."""


class GarbageBatch(StreamRefused):
    """The bytes are not a Batch."""


class NewerProtocol(StreamRefused):
    """The agent speaks a newer major protocol version than this aggregator."""


class HostNotAllowed(StreamRefused):
    """The batch names a host the stream's credentials (client cert, token) do not cover."""


@dataclass(frozen=True)
class Limits:
    max_future_s: float
    max_batch_samples: int


@dataclass(frozen=True)
class Refusal:
    stage: int
    index: int  # the workload's, for STAGE_WORKLOAD
    message: str


class Ends(NamedTuple):
    """A series' first and last sample (a series with samples), and which rollup its first minute is."""

    key: SeriesKey
    position: int  # in batch.devices or batch.workloads
    first_time_ns: int
    first_energy_j: float
    last_time_ns: int
    last_energy_j: float
    rollup: int  # index in rows.rollups


@dataclass
class Checked:
    """One batch as far as its bytes tell. ``unplaceable``: it names no instance or sequence (refused, recorded
    nowhere); ``refusal``: the first rule it breaks here; else ``rows`` is what to store, less the first samples'
    steps from the instance's last stored ones (``ends`` says where to add them)."""

    instance_id: str
    sequence: int
    oldest_pending_sequence: int
    host: HostInfo
    received_ns: int
    size: int
    unplaceable: str | None = None
    refusal: Refusal | None = None
    # (device, where): workloads on a device not in the batch, up to a refusal at STAGE_WORKLOAD, in order
    lookups: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0
    devices: dict[str, bool] = field(default_factory=dict)  # device_id -> in_host_total, of this batch
    device_ends: list[Ends] = field(default_factory=list)
    workload_ends: list[Ends] = field(default_factory=list)
    rows: PackedBatch | None = None
    power: dict[str, float] = field(default_factory=dict)  # in_host_total device -> latest W
    dropped: list[str] = field(default_factory=list)  # optional fields dropped (counted once stored)
    notes: list[str] = field(default_factory=list)  # what to log (info) once stored
    spans: list[ReceivedSpan] = field(default_factory=list)
    rejected_spans: int = 0


def parse_batch(data: bytes) -> pb.Batch:
    batch = pb.Batch()
    try:
        batch.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise GarbageBatch(
            f"{len(data)} bytes that are not a wattmeter.v1.Batch ({exc}); is the client a wattmeter agent?"
        ) from None
    return batch


def name_error(what: str, value: str, required: bool = True) -> str | None:
    if value in _valid_names:
        return None
    if not value:
        return f"{what} is empty" if required else None
    if len(value) > MAX_NAME:
        return f"{what} is longer than {MAX_NAME} characters"
    if _CONTROL.search(value):
        return f"{what} {value[:64]!r} has control characters"
    if len(_valid_names) >= MAX_VALID_NAMES:
        _valid_names.clear()
    _valid_names.add(value)
    return None


def workload_where(batch: pb.Batch, index: int) -> str:
    series = batch.workloads[index]
    return where_workload(index, series.device_id, series.workload.workload, series.workload.phase, series.workload.job)


def where_workload(index: int, device_id: str, workload: str, phase: str, job: str) -> str:
    return f"workloads[{index}] ({workload}/{phase}/{job} on {device_id})"


def _header_error(batch: pb.Batch) -> str | None:
    if batch.protocol_major == 0:
        return "protocol_major is 0 (not set): this aggregator speaks 1"
    if batch.oldest_pending_sequence > batch.sequence:
        return f"oldest_pending_sequence {batch.oldest_pending_sequence} is above sequence {batch.sequence}"
    return (
        name_error("host.hostname", batch.host.hostname)
        or name_error("host.machine_id", batch.host.machine_id, required=False)
        or name_error("host.boot_id", batch.host.boot_id, required=False)
    )


def check(data: bytes, received_ns: int, limits: Limits) -> Checked:
    """Parse and check ``data``, received at ``received_ns``. Raises ``GarbageBatch`` or ``NewerProtocol``."""
    batch = parse_batch(data)
    if batch.protocol_major > PROTOCOL_MAJOR:
        raise NewerProtocol(
            f"batch protocol_major {batch.protocol_major} is newer than this aggregator's {PROTOCOL_MAJOR}: "
            "upgrade the aggregator"
        )
    host = HostInfo(batch.host.hostname, batch.host.machine_id, batch.host.boot_id)
    checked = Checked(
        batch.agent_instance_id, batch.sequence, batch.oldest_pending_sequence, host, received_ns, len(data)
    )
    checked.unplaceable = name_error("agent_instance_id", batch.agent_instance_id) or (
        "sequence is 0 (sequences start at 1)" if batch.sequence == 0 else None
    )
    if checked.unplaceable is None:
        try:
            _check(batch, data, limits, checked)
        except _Refused as refused:
            checked.refusal = refused.refusal
            checked.rows = None
    return checked


class _Refused(Exception):
    def __init__(self, stage: int, message: str, index: int = 0) -> None:
        self.refusal = Refusal(stage, index, message)


def _check(batch: pb.Batch, data: bytes, limits: Limits, checked: Checked) -> None:
    header_error = _header_error(batch)
    if header_error is not None:
        raise _Refused(STAGE_HEADER, header_error)
    layout = wire.scan(data)
    if layout is not None and (
        len(layout.devices) != len(batch.devices) or len(layout.workloads) != len(batch.workloads)
    ):
        layout = None  # cannot be (the scan reads what protobuf parsed): read the parsed message
    if layout is not None:
        total = sum(r[1] - r[0] for r in layout.devices) + sum(r[1] - r[0] for r in layout.workloads)
        total //= wire.VALUE_BYTES
    else:
        total = sum(len(s.time_ns) for s in batch.devices) + sum(len(s.time_ns) for s in batch.workloads)
    if total > limits.max_batch_samples:
        raise _Refused(
            STAGE_HEADER,
            f"{total} samples, more than max_batch_samples ({limits.max_batch_samples}): "
            "send smaller batches or raise [ingest] max_batch_samples",
        )
    checked.samples = total
    devices = _check_devices(batch)
    checked.devices = devices
    identities, workload_devices = _check_workloads(batch, devices, checked.lookups)
    latest_ns = checked.received_ns + int(limits.max_future_s * 1e9)
    device_arrays = _Arrays.of_devices(batch, data, layout)
    workload_arrays = _Arrays.of_workloads(batch, data, layout)
    try:
        device_columns = device_arrays.check(lambda i: f"devices[{i}] ({batch.devices[i].device_id})", latest_ns)
        workload_columns = workload_arrays.check(lambda i: workload_where(batch, i), latest_ns)
    except InvalidBatch as exc:
        raise _Refused(STAGE_SAMPLES, str(exc)) from None
    power = _power(batch, data, layout, device_columns, checked)
    device_ids = list(devices)  # in batch order: a device appears once
    checked.rows = _rows(
        batch,
        checked,
        _Kind(device_ids, None, device_arrays, device_columns),
        _Kind(workload_devices, identities, workload_arrays, workload_columns),
        power,
    )
    checked.spans, checked.rejected_spans = _spans(batch, checked, latest_ns)


def _check_devices(batch: pb.Batch) -> dict[str, bool]:
    in_batch: dict[str, bool] = {}  # device_id -> in_host_total
    for index, series in enumerate(batch.devices):
        device_id = series.device_id
        error = name_error(f"devices[{index}].device_id", device_id)
        if error:
            raise _Refused(STAGE_HEADER, error)
        if device_id in in_batch:
            raise _Refused(STAGE_HEADER, f"devices[{index}] ({device_id}): the device appears twice in the batch")
        kind = series.kind
        if kind not in DEVICE_KINDS:
            raise _Refused(
                STAGE_HEADER, f"devices[{index}] ({device_id}): unknown device kind {kind[:64]!r} (gpu, cpu or dram)"
            )
        error = name_error(f"devices[{index}] ({device_id}).source", series.source, required=False)
        if error:
            raise _Refused(STAGE_HEADER, error)
        in_batch[device_id] = series.in_host_total
    return in_batch


def _check_workloads(
    batch: pb.Batch, in_batch: dict[str, bool], lookups: list[tuple[str, str]]
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Each workload series' identity and device; (device, where) of those on a device not in the batch into
    ``lookups``."""
    identities: list[tuple[str, str, str]] = []
    device_ids: list[str] = []
    seen: set[tuple[str, tuple[str, str, str]]] = set()
    for index, series in enumerate(batch.workloads):
        workload = series.workload
        identity = (workload.workload, workload.phase, workload.job)
        device_id = series.device_id
        error = (
            name_error("workload", identity[0])
            or name_error("job", identity[2], required=False)
            or name_error("device_id", device_id)
        )
        if error:
            raise _Refused(STAGE_WORKLOAD, f"{workload_where(batch, index)}: {error}", index)
        phase = identity[1]
        if phase == "":
            if identity[0] not in SPECIAL_WORKLOADS:
                message = "phase is empty, which only idle, system and other may have"
                raise _Refused(STAGE_WORKLOAD, f"{workload_where(batch, index)}: {message}", index)
        elif phase not in PHASES:
            message = f"unknown phase {phase[:64]!r} (training, inference or unknown)"
            raise _Refused(STAGE_WORKLOAD, f"{workload_where(batch, index)}: {message}", index)
        if (device_id, identity) in seen:
            raise _Refused(
                STAGE_WORKLOAD, f"{workload_where(batch, index)}: the series appears twice in the batch", index
            )
        seen.add((device_id, identity))
        if device_id not in in_batch:
            lookups.append((device_id, workload_where(batch, index)))
        identities.append(identity)
        device_ids.append(device_id)
    return identities, device_ids


@dataclass
class _Arrays:
    """One kind of series (devices or workloads) joined: counts, values, and each series' blobs to store."""

    time_counts: list[int]
    energy_counts: list[int]
    times: columns.UInt64Array
    energy: Float64Array
    blobs: list[tuple[bytes, bytes]]  # per series: time_ns, energy_j as stored (empty when counts differ)

    @classmethod
    def of_devices(cls, batch: pb.Batch, data: bytes, layout: wire.Layout | None) -> _Arrays:
        if layout is None:
            return cls.parsed(batch.devices)
        return cls.scanned(data, layout.devices)

    @classmethod
    def of_workloads(cls, batch: pb.Batch, data: bytes, layout: wire.Layout | None) -> _Arrays:
        if layout is None:
            return cls.parsed(batch.workloads)
        return cls.scanned(data, layout.workloads)

    @classmethod
    def scanned(cls, data: bytes, ranges: list[wire.Ranges]) -> _Arrays:
        blobs = [(data[r[0] : r[1]], data[r[2] : r[3]]) for r in ranges]
        return cls(
            [(r[1] - r[0]) // wire.VALUE_BYTES for r in ranges],
            [(r[3] - r[2]) // wire.VALUE_BYTES for r in ranges],
            np.frombuffer(b"".join([t for t, _ in blobs]), dtype="<u8").astype(np.uint64, copy=False),
            np.frombuffer(b"".join([e for _, e in blobs]), dtype="<f8").astype(np.float64, copy=False),
            blobs,
        )

    @classmethod
    def parsed(cls, series: Sequence[pb.DeviceSeries] | Sequence[pb.WorkloadSeries]) -> _Arrays:
        time_counts = [len(s.time_ns) for s in series]
        energy_counts = [len(s.energy_j) for s in series]
        times = np.array([t for s in series for t in s.time_ns], dtype=np.uint64)
        energy = np.array([e for s in series for e in s.energy_j], dtype=np.float64)
        blobs: list[tuple[bytes, bytes]] = []
        if time_counts == energy_counts:
            start = 0
            for count in time_counts:
                blobs.append((times[start : start + count].astype("<u8").tobytes(),
                              energy[start : start + count].astype("<f8").tobytes()))  # fmt: skip
                start += count
        return cls(time_counts, energy_counts, times, energy, blobs)

    def check(self, where: columns.Where, latest_ns: int) -> Columns:
        offsets = [0]
        for index, (count, energy_count) in enumerate(zip(self.time_counts, self.energy_counts, strict=True)):
            if energy_count != count:
                raise InvalidBatch(f"{where(index)}: {energy_count} energy_j values for {count} time_ns values")
            offsets.append(offsets[-1] + count)
        return columns.check(offsets, self.times, self.energy, where, latest_ns)


def _power(
    batch: pb.Batch, data: bytes, layout: wire.Layout | None, joined: Columns, checked: Checked
) -> list[bytes | None]:
    """Each device's power blob to store (None: none sent, or dropped: negative or infinite values); the latest
    measured power of in_host_total devices into ``checked.power``."""
    if layout is not None:
        sent = [data[r[4] : r[5]] for r in layout.devices]
    else:
        sent = [np.array(s.power_w, dtype=np.float64).astype("<f8").tobytes() for s in batch.devices]
    out: list[bytes | None] = []
    for index, blob in enumerate(sent):
        if not blob:
            out.append(None)
            continue
        count = joined.size(index)
        if len(blob) != count * wire.VALUE_BYTES:
            where = f"devices[{index}] ({batch.devices[index].device_id})"
            raise _Refused(
                STAGE_POWER, f"{where}: {len(blob) // wire.VALUE_BYTES} power_w values for {count} time_ns values"
            )
        out.append(blob)
    present = [blob for blob in out if blob]
    if not present:
        return out
    values = np.frombuffer(b"".join(present), dtype="<f8")
    missing = np.isnan(values)
    bad = ~missing & (np.isinf(values) | (values < 0))
    bad_before = np.concatenate(([0], np.cumsum(bad))).tolist()
    # position of the latest measured value at or before each position
    latest = np.maximum.accumulate(np.where(missing, -1, np.arange(len(values)))).tolist()
    listed = values.tolist()
    start = 0
    for index, kept in enumerate(out):
        if kept is None:
            continue
        end = start + len(kept) // wire.VALUE_BYTES
        series = batch.devices[index]
        if bad_before[end] != bad_before[start]:
            # power is a side reading: the energy counter is the measurement, so keep it and drop the power
            checked.notes.append(f"devices[{index}] ({series.device_id}): power_w negative or infinite, dropped")
            checked.dropped.append("power_w")
            out[index] = None
        elif series.in_host_total and latest[end - 1] >= start:
            checked.power[series.device_id] = listed[latest[end - 1]]
        start = end
    return out


class _Kind(NamedTuple):
    """Devices or workloads of a batch."""

    device_ids: list[str]
    identities: list[tuple[str, str, str]] | None  # None: devices
    arrays: _Arrays
    joined: Columns


def _rows(
    batch: pb.Batch, checked: Checked, devices: _Kind, workloads: _Kind, power: list[bytes | None]
) -> PackedBatch:
    """The rows to store; each series' ``Ends`` into ``checked``. Series are numbered devices first."""
    sequence = batch.sequence
    numbered = ((0, devices, checked.device_ends), (len(devices.device_ids), workloads, checked.workload_ends))
    # (minute, device, workload, joules, series number), sorted by bucket below
    increments: list[tuple[int, str, WorkloadKey, float, int]] = []
    for offset, (ids, identities, _, joined), _ in numbered:
        for index, minute, joules in columns.minute_sums(joined, columns.within_deltas(joined)):
            key = DEVICE_KEY if identities is None else identities[index]
            increments.append((minute, ids[index], key, joules, offset + index))
    increments.sort(key=lambda row: row[:3])  # unique: one series per (device, workload), one row per minute
    first_rollup: dict[int, int] = {}
    for position, increment in enumerate(increments):
        first_rollup.setdefault(increment[4], position)
    rollups: list[RollupRow] = [(minute, device, key, joules) for minute, device, key, joules, _ in increments]

    device_rows: set[tuple[str, str, str, bool]] = set()
    device_chunks: list[DeviceChunkRow] = []
    workload_chunks: list[tuple[WorkloadKey, WorkloadChunkRow]] = []
    for offset, (ids, identities, arrays, joined), ends in numbered:
        offsets = joined.offsets
        present = [i for i in range(len(ids)) if offsets[i + 1] > offsets[i]]
        firsts = [offsets[i] for i in present]
        lasts = [offsets[i + 1] - 1 for i in present]
        first_times, last_times = joined.time_ns[firsts].tolist(), joined.time_ns[lasts].tolist()
        first_energy, last_energy = joined.energy_j[firsts].tolist(), joined.energy_j[lasts].tolist()
        for n, index in enumerate(present):
            device_id = ids[index]
            first, last = first_times[n], last_times[n]
            identity = None if identities is None else identities[index]
            ends.append(
                Ends((device_id, identity), index, first, first_energy[n], last, last_energy[n],
                     first_rollup[offset + index])
            )  # fmt: skip
            time_blob, energy_blob = arrays.blobs[index]
            if identity is None:
                series = batch.devices[index]
                device_rows.add((device_id, series.kind, series.source, bool(series.in_host_total)))
                device_chunks.append((device_id, first, last, sequence, time_blob, energy_blob, power[index]))
            else:
                workload_chunks.append((identity, (device_id, first, last, sequence, time_blob, energy_blob)))
    workload_keys = {key for key, _ in workload_chunks}
    workload_keys.update(key for _, _, key, _ in rollups)
    return PackedBatch(sorted(device_rows), device_chunks, workload_chunks, rollups, sorted(workload_keys))


def _spans(batch: pb.Batch, checked: Checked, latest_ns: int) -> tuple[list[ReceivedSpan], int]:
    hostname = checked.host.hostname
    accepted: list[ReceivedSpan] = []
    rejected = 0
    for span in batch.spans:
        span_host = span.hostname or hostname
        if span_host != hostname:
            error: str | None = f"request {span.request_id[:64]!r}: hostname {span_host[:64]!r} is not the batch's host"
        else:
            error = span_error(span, span_host, latest_ns)
        if error is None:
            accepted.append(ReceivedSpan(span_host, span))
        else:
            rejected += 1
            checked.notes.append(f"dropped a span from {hostname}: {error}")
    return accepted, rejected
