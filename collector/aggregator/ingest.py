"""Ingest: one batch's bytes -> parsed, checked, rolled up, stored once through the ``Store``, and the Ack.

Runs in a worker thread (the gRPC event loop never waits on a store). A batch is acknowledged only after
``Store.write_batch`` returned. An invalid batch is refused whole with an Ack that carries its sequence and why
(recorded in the store as done, empty, so the instance's watermark moves past it); only optional fields (a power
array with negative values, bad spans) are dropped and counted while the rest is stored. Problems that concern the
stream rather than one batch (bytes that are not a Batch, a newer protocol, a host the credentials do not cover)
raise ``StreamRefused`` subclasses, which the gRPC server maps to status codes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from collector.aggregator import columns
from collector.aggregator.columns import InvalidBatch
from collector.aggregator.config import IngestConfig
from collector.aggregator.metrics import AggregatorMetrics, phase_label
from collector.aggregator.spans import ReceivedSpan, SpanBuffer, span_error
from collector.errors import WattmeterError
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import (
    DeviceChunk,
    Float64Array,
    HostInfo,
    LastSample,
    RollupIncrement,
    Store,
    StoredBatch,
    WorkloadChunk,
    WriteResult,
)

log = logging.getLogger(__name__)

PROTOCOL_MAJOR = 1
DEVICE_KINDS = frozenset({"gpu", "cpu", "dram"})
PHASES = frozenset({"training", "inference", "unknown"})
SPECIAL_WORKLOADS = frozenset({"idle", "system", "other"})  # sent with phase ""
MAX_NAME = 256  # characters in a hostname, id or workload name
MAX_INSTANCES = 4096  # instances whose state stays cached; the others are read back from the store when they return

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
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
class Outcome:
    result: str  # stored | duplicate | rejected
    ack: pb.Ack
    instance_id: str


@dataclass
class _InstanceState:
    acked: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    devices: dict[str, bool] = field(default_factory=dict)  # device_id -> in_host_total, for devices it has sent
    last: dict[SeriesKey, LastSample | None] = field(default_factory=dict)  # None: the store has none either


@dataclass
class _Prepared:
    stored: StoredBatch
    samples: int
    last: dict[SeriesKey, LastSample]
    devices: dict[str, bool]
    energy: dict[tuple[str, str], float]  # (host, phase label) -> J, workloads on in_host_total devices
    power: dict[str, float]  # device -> latest W, in_host_total devices
    spans: list[ReceivedSpan]
    rejected_spans: int
    dropped: list[str]


def parse_batch(data: bytes) -> pb.Batch:
    batch = pb.Batch()
    try:
        batch.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise GarbageBatch(
            f"{len(data)} bytes that are not a wattmeter.v1.Batch ({exc}); is the client a wattmeter agent?"
        ) from None
    return batch


def _name_error(what: str, value: str, required: bool = True) -> str | None:
    if required and not value:
        return f"{what} is empty"
    if len(value) > MAX_NAME:
        return f"{what} is longer than {MAX_NAME} characters"
    if _CONTROL.search(value):
        return f"{what} {value[:64]!r} has control characters"
    return None


def _follow_error(first_time_ns: int, first_energy_j: float, last: LastSample) -> str | None:
    """Why a series' first sample cannot follow the last stored one; None when it can."""
    if first_time_ns <= last.time_ns:
        return f"time_ns {first_time_ns} is not after the last stored sample's ({last.time_ns}) of this agent instance"
    if first_energy_j < last.energy_j:
        return (
            f"energy_j {first_energy_j!r} is below the last stored sample's ({last.energy_j!r}) "
            "of this agent instance: the counter went backwards"
        )
    return None


def _workload_where(batch: pb.Batch, index: int) -> str:
    series = batch.workloads[index]
    identity = series.workload
    return f"workloads[{index}] ({identity.workload}/{identity.phase}/{identity.job} on {series.device_id})"


class Ingest:
    """Validates and stores batches; keeps per-instance state (watermark, last samples, devices) in memory and
    reads it back from the store for an instance it does not hold (after a restart or ``forget``)."""

    def __init__(
        self,
        store: Store,
        config: IngestConfig,
        metrics: AggregatorMetrics,
        spans: SpanBuffer,
        clock_ns: Callable[[], int] = time.time_ns,
        max_instances: int = MAX_INSTANCES,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.spans = spans
        self.clock_ns = clock_ns
        self.max_instances = max_instances
        self._instances: OrderedDict[str, _InstanceState] = OrderedDict()
        self._lock = threading.Lock()
        self.store_error: str | None = None  # why the last write failed; None once one succeeds

    def _write(self, batch: StoredBatch) -> WriteResult:
        result = self.store.write_batch(batch)
        self.store_error = None
        return result

    def forget(self, instance_id: str) -> None:
        """Drop what is cached of ``instance_id``: its next batch reads the store (another aggregator sharing the
        database may have stored its batches meanwhile)."""
        with self._lock:
            self._instances.pop(instance_id, None)

    def _state(self, instance_id: str) -> _InstanceState:
        with self._lock:
            state = self._instances.get(instance_id)
            if state is not None:
                self._instances.move_to_end(instance_id)
                return state
        state = _InstanceState(acked=self.store.acked_sequence(instance_id))
        with self._lock:
            existing = self._instances.get(instance_id)
            if existing is not None:
                return existing
            self._instances[instance_id] = state
            while len(self._instances) > self.max_instances:
                self._instances.popitem(last=False)
            return state

    def handle(
        self, data: bytes, allowed_hosts: frozenset[str] | None = None, seen_instances: set[str] | None = None
    ) -> Outcome:
        """Ingest one serialized Batch. ``allowed_hosts``: the hosts the stream's credentials cover (None: any).
        ``seen_instances``: the instances met on this stream so far; the first batch of any other re-reads what
        the store holds of it (see ``forget``).

        Raises ``StreamRefused`` for the stream, and whatever the store raises when a write fails (then nothing
        is acknowledged: the agent sends the batch again).
        """
        batch = parse_batch(data)
        if batch.protocol_major > PROTOCOL_MAJOR:
            raise NewerProtocol(
                f"batch protocol_major {batch.protocol_major} is newer than this aggregator's {PROTOCOL_MAJOR}: "
                "upgrade the aggregator"
            )
        hostname = batch.host.hostname
        if allowed_hosts is not None and hostname not in allowed_hosts:
            raise HostNotAllowed(
                f"batch for host {hostname[:MAX_NAME]!r}, but the stream's credentials are for "
                f"{', '.join(sorted(allowed_hosts)) or 'no host'}"
            )
        instance_id = batch.agent_instance_id
        unplaceable = _name_error("agent_instance_id", instance_id) or (
            "sequence is 0 (sequences start at 1)" if batch.sequence == 0 else None
        )
        if unplaceable is not None:
            # nothing to record: without an instance and a sequence the store cannot place this batch
            self.metrics.count_batch("rejected")
            log.warning("rejected a batch from %r: %s", hostname[:64], unplaceable)
            return Outcome(
                "rejected",
                pb.Ack(agent_instance_id=instance_id, rejected_sequence=batch.sequence, error=unplaceable),
                instance_id,
            )
        if seen_instances is not None and instance_id not in seen_instances:
            seen_instances.add(instance_id)
            self.forget(instance_id)
        try:
            state = self._state(instance_id)
            with state.lock:
                return self._handle_locked(batch, state, len(data))
        except Exception as exc:  # the store failed (an invalid batch is an Ack, never an exception)
            self.store_error = f"{type(exc).__name__}: {exc}"
            raise

    @staticmethod
    def _header_error(batch: pb.Batch) -> str | None:
        if batch.protocol_major == 0:
            return "protocol_major is 0 (not set): this aggregator speaks 1"
        if batch.oldest_pending_sequence > batch.sequence:
            return f"oldest_pending_sequence {batch.oldest_pending_sequence} is above sequence {batch.sequence}"
        return (
            _name_error("host.hostname", batch.host.hostname)
            or _name_error("host.machine_id", batch.host.machine_id, required=False)
            or _name_error("host.boot_id", batch.host.boot_id, required=False)
        )

    def _handle_locked(self, batch: pb.Batch, state: _InstanceState, size: int) -> Outcome:
        instance_id = batch.agent_instance_id
        if batch.sequence <= state.acked:
            self.metrics.count_batch("duplicate")
            return Outcome("duplicate", pb.Ack(agent_instance_id=instance_id, acked_sequence=state.acked), instance_id)
        host = HostInfo(batch.host.hostname, batch.host.machine_id, batch.host.boot_id)
        received_ns = self.clock_ns()
        try:
            header_error = self._header_error(batch)
            if header_error is not None:
                raise InvalidBatch(header_error)
            prepared = self._prepare(batch, state, host, received_ns, size)
        except InvalidBatch as exc:
            return self._reject(batch, state, host, received_ns, str(exc))
        result = self._write(prepared.stored)
        state.acked = result.acked_sequence
        ack = pb.Ack(agent_instance_id=instance_id, acked_sequence=result.acked_sequence)
        if not result.stored:
            # stored before, above the watermark we held: what we cached of this instance is behind the store
            state.last.clear()
            state.devices.clear()
            self.metrics.count_batch("duplicate")
            return Outcome("duplicate", ack, instance_id)
        state.last.update(prepared.last)
        state.devices.update(prepared.devices)
        self.metrics.count_batch("stored")
        for name in prepared.dropped:
            self.metrics.count_dropped(name)
        self.metrics.count_spans(len(prepared.spans), prepared.rejected_spans)
        self.spans.extend(prepared.spans)
        self.metrics.add_stored(prepared.samples, prepared.energy, {host.hostname: prepared.power})
        return Outcome("stored", ack, instance_id)

    def _reject(self, batch: pb.Batch, state: _InstanceState, host: HostInfo, received_ns: int, why: str) -> Outcome:
        instance_id = batch.agent_instance_id
        log.warning("rejected batch %s/%d from %s: %s", instance_id, batch.sequence, host.hostname, why)
        empty = StoredBatch(
            instance_id=instance_id,
            sequence=batch.sequence,
            oldest_pending_sequence=min(batch.oldest_pending_sequence, batch.sequence),
            host=host,
            received_ns=received_ns,
        )
        result = self._write(empty)
        state.acked = result.acked_sequence
        self.metrics.count_batch("rejected")
        ack = pb.Ack(
            agent_instance_id=instance_id,
            acked_sequence=result.acked_sequence,
            rejected_sequence=batch.sequence,
            error=why,
        )
        return Outcome("rejected", ack, instance_id)

    def _last(self, state: _InstanceState, instance_id: str, key: SeriesKey) -> LastSample | None:
        if key in state.last:
            return state.last[key]
        last = self.store.last_sample(instance_id, key[0], key[1])
        state.last[key] = last
        return last

    def _known_device(self, state: _InstanceState, instance_id: str, hostname: str, device_id: str) -> bool | None:
        """in_host_total of a device this instance sent before; None when it never did."""
        if device_id in state.devices:
            return state.devices[device_id]
        if self._last(state, instance_id, (device_id, None)) is None:
            return None
        in_host_total = next(
            (
                device.in_host_total
                for row in self.store.hosts()
                if row.hostname == hostname
                for device in row.devices
                if device.device_id == device_id
            ),
            False,
        )
        state.devices[device_id] = in_host_total
        return in_host_total

    def _prepare(
        self, batch: pb.Batch, state: _InstanceState, host: HostInfo, received_ns: int, size: int
    ) -> _Prepared:
        instance_id = batch.agent_instance_id
        total = sum(len(s.time_ns) for s in batch.devices) + sum(len(s.time_ns) for s in batch.workloads)
        if total > self.config.max_batch_samples:
            raise InvalidBatch(
                f"{total} samples, more than max_batch_samples ({self.config.max_batch_samples}): "
                "send smaller batches or raise [ingest] max_batch_samples"
            )
        latest_ns = received_ns + int(self.config.max_future_s * 1e9)
        in_batch: dict[str, bool] = {}  # device_id -> in_host_total
        for index, series in enumerate(batch.devices):
            error = _name_error(f"devices[{index}].device_id", series.device_id)
            if error:
                raise InvalidBatch(error)
            where = f"devices[{index}] ({series.device_id})"
            if series.device_id in in_batch:
                raise InvalidBatch(f"{where}: the device appears twice in the batch")
            if series.kind not in DEVICE_KINDS:
                raise InvalidBatch(f"{where}: unknown device kind {series.kind[:64]!r} (gpu, cpu or dram)")
            error = _name_error(f"{where}.source", series.source, required=False)
            if error:
                raise InvalidBatch(error)
            in_batch[series.device_id] = series.in_host_total
        identities: list[tuple[str, str, str]] = []
        workload_in_total: list[bool] = []
        seen: set[tuple[str, tuple[str, str, str]]] = set()
        for index, wseries in enumerate(batch.workloads):
            identity = (wseries.workload.workload, wseries.workload.phase, wseries.workload.job)
            error = (
                _name_error("workload", identity[0])
                or _name_error("job", identity[2], required=False)
                or _name_error("device_id", wseries.device_id)
            )
            where = _workload_where(batch, index) if error or identity[1] not in PHASES else ""
            if error:
                raise InvalidBatch(f"{where}: {error}")
            if identity[1] == "":
                if identity[0] not in SPECIAL_WORKLOADS:
                    raise InvalidBatch(f"{where}: phase is empty, which only idle, system and other may have")
            elif identity[1] not in PHASES:
                raise InvalidBatch(f"{where}: unknown phase {identity[1][:64]!r} (training, inference or unknown)")
            if (wseries.device_id, identity) in seen:
                raise InvalidBatch(f"{_workload_where(batch, index)}: the series appears twice in the batch")
            seen.add((wseries.device_id, identity))
            in_host_total = in_batch.get(wseries.device_id)
            if in_host_total is None:
                in_host_total = self._known_device(state, instance_id, host.hostname, wseries.device_id)
            if in_host_total is None:
                raise InvalidBatch(
                    f"{_workload_where(batch, index)}: unknown device {wseries.device_id!r} "
                    "(not in this batch, never sent by this agent)"
                )
            identities.append(identity)
            workload_in_total.append(in_host_total)

        device_columns = columns.gather(
            batch.devices, lambda i: f"devices[{i}] ({batch.devices[i].device_id})", latest_ns
        )
        workload_columns = columns.gather(batch.workloads, lambda i: _workload_where(batch, i), latest_ns)
        device_keys: list[SeriesKey] = [(series.device_id, None) for series in batch.devices]
        workload_keys: list[SeriesKey] = [
            (series.device_id, identity) for series, identity in zip(batch.workloads, identities, strict=True)
        ]
        last: dict[SeriesKey, LastSample] = {}
        device_previous = self._follow_all(state, instance_id, device_columns, device_keys, last, "devices", batch)
        workload_previous = self._follow_all(
            state, instance_id, workload_columns, workload_keys, last, "workloads", batch
        )

        devices: list[DeviceChunk] = []
        power: dict[str, float] = {}
        dropped: list[str] = []
        for index, series in enumerate(batch.devices):
            count = device_columns.size(index)
            power_w = self._power(f"devices[{index}] ({series.device_id})", series, count, dropped)
            if count == 0:
                continue
            time_ns, energy_j = device_columns.slice(index)
            devices.append(
                DeviceChunk(
                    series.device_id, series.kind, series.source, series.in_host_total, time_ns, energy_j, power_w
                )
            )
            if series.in_host_total and power_w is not None:
                measured = power_w[~np.isnan(power_w)]
                if len(measured):
                    power[series.device_id] = float(measured[-1])
        workloads = [
            WorkloadChunk(*identity, series.device_id, *workload_columns.slice(index))
            for index, (series, identity) in enumerate(zip(batch.workloads, identities, strict=True))
            if workload_columns.size(index)
        ]

        rollups: list[RollupIncrement] = []
        device_joules = columns.deltas(device_columns, device_previous)
        for index, minute, joules in columns.minute_sums(device_columns, device_joules):
            rollups.append(RollupIncrement(minute, batch.devices[index].device_id, "", "", "", joules))
        workload_joules = columns.deltas(workload_columns, workload_previous)
        energy: dict[tuple[str, str], float] = {}
        for index, minute, joules in columns.minute_sums(workload_columns, workload_joules):
            identity = identities[index]
            rollups.append(RollupIncrement(minute, batch.workloads[index].device_id, *identity, joules))
            if workload_in_total[index]:
                label = (host.hostname, phase_label(identity[0], identity[1]))
                energy[label] = energy.get(label, 0.0) + joules

        spans: list[ReceivedSpan] = []
        rejected_spans = 0
        for span in batch.spans:
            span_host = span.hostname or host.hostname
            if span_host != host.hostname:
                error = f"request {span.request_id[:64]!r}: hostname {span_host[:64]!r} is not the batch's host"
            else:
                error = span_error(span, span_host, latest_ns)
            if error is None:
                spans.append(ReceivedSpan(span_host, span))
            else:
                rejected_spans += 1
                log.info("dropped a span from %s: %s", host.hostname, error)

        stored = StoredBatch(
            instance_id=instance_id,
            sequence=batch.sequence,
            oldest_pending_sequence=batch.oldest_pending_sequence,
            host=host,
            received_ns=received_ns,
            devices=devices,
            workloads=workloads,
            rollups=rollups,
            raw_bytes=size,
        )
        return _Prepared(stored, total, last, in_batch, energy, power, spans, rejected_spans, dropped)

    def _follow_all(
        self,
        state: _InstanceState,
        instance_id: str,
        joined: columns.Columns,
        keys: list[SeriesKey],
        last: dict[SeriesKey, LastSample],
        field_name: str,
        batch: pb.Batch,
    ) -> list[float | None]:
        """Check each series goes on from its last stored sample; note its new last sample in ``last``. Returns
        each series' previous energy (None: a new series, or an empty one)."""
        previous_energy: list[float | None] = []
        offsets = joined.offsets
        times = joined.time_ns.tolist() if len(joined) else []
        energy = joined.energy_j.tolist() if len(joined) else []
        for index, key in enumerate(keys):
            first, end = offsets[index], offsets[index + 1]
            if first == end:
                previous_energy.append(None)
                continue
            previous = self._last(state, instance_id, key)
            if previous is not None:
                error = _follow_error(times[first], energy[first], previous)
                if error is not None:
                    where = f"devices[{index}] ({key[0]})" if field_name == "devices" else _workload_where(batch, index)
                    raise InvalidBatch(f"{where}: {error}")
            last[key] = LastSample(times[end - 1], energy[end - 1])
            previous_energy.append(None if previous is None else previous.energy_j)
        return previous_energy

    @staticmethod
    def _power(where: str, series: pb.DeviceSeries, count: int, dropped: list[str]) -> Float64Array | None:
        if len(series.power_w) == 0:
            return None
        power = np.array(series.power_w, dtype=np.float64)
        if len(power) != count:
            raise InvalidBatch(f"{where}: {len(power)} power_w values for {count} time_ns values")
        measured = power[~np.isnan(power)]
        if len(measured) and (not bool(np.all(np.isfinite(measured))) or float(measured.min()) < 0):
            # power is a side reading: the energy counter is the measurement, so keep it and drop the power
            log.info("%s: power_w negative or infinite, dropped", where)
            dropped.append("power_w")
            return None
        return power
