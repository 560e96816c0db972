"""Ingest: one batch's bytes -> checked (``checks``, in worker processes or on the event loop), then, in the one
place that orders each agent instance's batches, checked against what the instance sent before, stored once
(``writer``: group commit), and the Ack.

A batch is acknowledged only after the transaction holding it committed. An invalid batch is refused whole with an
Ack that carries its sequence and why (recorded in the store as done, empty, so the instance's watermark moves past
it); only optional fields (a power array with negative values, bad spans, process bindings, steps series or label
sets) are dropped and counted while the rest is stored. The batch's spans, pid -> workload bindings, training
steps and workload labels are stored in its transaction.
Problems that concern the stream rather than one batch (bytes that are not a Batch, a newer protocol, a host the
credentials do not cover) raise ``StreamRefused`` subclasses, which the gRPC server maps to status codes.

Per instance (an asyncio lock; batches of other instances go on meanwhile): the duplicate check against the
watermark, the checks that need the instance's history (a workload's device sent in an earlier batch; each
series' first sample against its last stored one), the first samples' steps into the rollups, the write, and the
instance's state (watermark, last samples, devices) kept in memory and read back from the store when it is not
held (after a restart, or ``forget``).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from collector.aggregator.checker import Checker
from collector.aggregator.checks import Checked
from collector.aggregator.metrics import AggregatorMetrics, phase_label
from collector.aggregator.rules import (
    MAX_NAME,
    STAGE_HEADER,
    STAGE_POWER,
    GarbageBatch,
    HostNotAllowed,
    NewerProtocol,
    StreamRefused,
)
from collector.aggregator.shape import SeriesKey
from collector.aggregator.writer import GroupWriter
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import Store, StoredBatch, WriteResult
from collector.store.rows import PackedBatch, RollupRow

__all__ = ["GarbageBatch", "HostNotAllowed", "Ingest", "NewerProtocol", "Outcome", "StreamRefused"]

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_INSTANCES = 4096  # instances whose state stays cached; the others are read back from the store when they return


@dataclass(frozen=True)
class Outcome:
    result: str  # stored | duplicate | rejected
    ack: pb.Ack
    instance_id: str


Last = tuple[int, float]  # a series' last stored sample: time_ns, energy_j


@dataclass
class _InstanceState:
    acked: int | None = None  # None: to be read from the store (new here, forgotten, or a write's outcome unknown)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # batches holding or waiting for the lock: a state in use is never evicted
    stale: bool = False  # forgotten: reset by the next batch that holds the lock
    devices: dict[str, bool] = field(default_factory=dict)  # device_id -> in_host_total, for devices it has sent
    last: dict[SeriesKey, Last | None] = field(default_factory=dict)  # None: the store has none either

    def reset(self) -> None:
        self.acked = None
        self.devices.clear()
        self.last.clear()


@dataclass(frozen=True)
class _Settled:
    """A batch that passed every check: what to store, and what it changes once stored."""

    stored: StoredBatch
    energy: dict[tuple[str, str], float]  # (host, phase label) -> J, workloads on in_host_total devices


class _Duplicate:
    """Stored already (at or below the watermark held)."""


_DUPLICATE = _Duplicate()
_UNKNOWN = (-1, -1.0)  # a series' last sample not held (None: held, and the store has none)


def follow_error(first_time_ns: int, first_energy_j: float, last: Last) -> str | None:
    """Why a series' first sample cannot follow the last stored one; None when it can."""
    if first_time_ns <= last[0]:
        return f"time_ns {first_time_ns} is not after the last stored sample's ({last[0]}) of this agent instance"
    if first_energy_j < last[1]:
        return (
            f"energy_j {first_energy_j!r} is below the last stored sample's ({last[1]!r}) "
            "of this agent instance: the counter went backwards"
        )
    return None


async def _finish(job: asyncio.Future[T], state: _InstanceState) -> T:
    """``job``'s result. ``job`` works on ``state`` in another thread: cancelled meanwhile, this still waits for it
    to end (the caller holds ``state``'s lock until then), and then raises CancelledError."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(job)
            break
        except asyncio.CancelledError:
            if job.cancelled():
                raise
            cancelled = True
            if job.done():
                break
    if cancelled:
        state.reset()
        raise asyncio.CancelledError
    return result


class Ingest:
    """Checks, orders and stores batches; ``handle`` runs on the event loop. ``executor`` runs what may read the
    store (an instance's state it does not hold)."""

    def __init__(
        self,
        store: Store,
        checker: Checker,
        writer: GroupWriter,
        metrics: AggregatorMetrics,
        executor: Executor,
        clock_ns: Callable[[], int] = time.time_ns,
        max_instances: int = MAX_INSTANCES,
    ) -> None:
        self.store = store
        self.checker = checker
        self.writer = writer
        self.metrics = metrics
        self.executor = executor
        self.clock_ns = clock_ns
        self.max_instances = max_instances
        self._instances: OrderedDict[str, _InstanceState] = OrderedDict()
        self.store_error: str | None = None  # why the last write failed; None once one succeeds
        self.on_late_samples: Callable[[str, int, int], None] | None = None
        """Called with (host, first, last sample ns) of a stored batch whose samples began more than
        ``late_after_ns`` ago (an agent replaying its spool): requests finalised without them are computed again."""
        self.late_after_ns = 0

    def forget(self, instance_id: str) -> None:
        """Its next batch re-reads what the store holds of ``instance_id`` (another aggregator sharing the
        database may have stored its batches meanwhile)."""
        state = self._instances.get(instance_id)
        if state is not None:
            # not dropped nor reset now: a batch of it may hold its lock (the next must wait for it) and be using it
            state.stale = True

    def _state(self, instance_id: str) -> _InstanceState:
        state = self._instances.get(instance_id)
        if state is not None:
            self._instances.move_to_end(instance_id)
            return state
        state = self._instances[instance_id] = _InstanceState()
        excess = len(self._instances) - self.max_instances
        if excess > 0:
            idle = (old for old, held in self._instances.items() if not held.users and held is not state)
            for old in list(itertools.islice(idle, excess)):
                del self._instances[old]
        return state

    async def handle(
        self, data: bytes, allowed_hosts: frozenset[str] | None = None, seen_instances: set[str] | None = None
    ) -> Outcome:
        """Ingest one serialized Batch. ``allowed_hosts``: the hosts the stream's credentials cover (None: any).
        ``seen_instances``: the instances met on this stream so far; the first batch of any other re-reads what
        the store holds of it (see ``forget``).

        Raises ``StreamRefused`` for the stream, ``checker.CheckFailed`` when the batch could not be checked, and
        whatever the store raises when a write fails (then nothing is acknowledged: the agent sends it again).
        """
        checked = await self.checker.check(data, self.clock_ns())
        hostname = checked.host.hostname
        if allowed_hosts is not None and hostname not in allowed_hosts:
            raise HostNotAllowed(
                f"batch for host {hostname[:MAX_NAME]!r}, but the stream's credentials are for "
                f"{', '.join(sorted(allowed_hosts)) or 'no host'}"
            )
        instance_id = checked.instance_id
        if checked.unplaceable is not None:
            # nothing to record: without an instance and a sequence the store cannot place this batch
            self.metrics.count_batch("rejected")
            log.warning("rejected a batch from %r: %s", hostname[:64], checked.unplaceable)
            return Outcome(
                "rejected",
                pb.Ack(agent_instance_id=instance_id, rejected_sequence=checked.sequence, error=checked.unplaceable),
                instance_id,
            )
        if seen_instances is not None and instance_id not in seen_instances:
            seen_instances.add(instance_id)
            self.forget(instance_id)
        state = self._state(instance_id)
        state.users += 1
        try:
            async with state.lock:
                return await self._handle_locked(checked, state)
        except Exception as exc:  # the store failed (an invalid batch is an Ack, never an exception)
            self.store_error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            state.users -= 1

    async def _handle_locked(self, checked: Checked, state: _InstanceState) -> Outcome:
        instance_id = checked.instance_id
        if state.stale:
            state.stale = False
            state.reset()
        settled = self._settle(checked, state, may_read=False)
        if settled is None:  # it needs the store: read it, not on the event loop
            settle = functools.partial(self._settle, checked, state, may_read=True)
            job = asyncio.get_running_loop().run_in_executor(self.executor, settle)
            settled = await _finish(job, state)
        assert settled is not None
        if isinstance(settled, _Duplicate):
            self.metrics.count_batch("duplicate")
            return Outcome("duplicate", pb.Ack(agent_instance_id=instance_id, acked_sequence=state.acked), instance_id)
        if isinstance(settled, str):
            return await self._reject(checked, state, settled)
        result = await self._write(state, settled.stored, checked.samples)
        self.store_error = None
        state.acked = result.acked_sequence
        ack = pb.Ack(agent_instance_id=instance_id, acked_sequence=result.acked_sequence)
        if not result.stored:
            # stored before, above the watermark we held: what we cached of this instance is behind the store
            state.last.clear()
            state.devices.clear()
            self.metrics.count_batch("duplicate")
            return Outcome("duplicate", ack, instance_id)
        last = zip(checked.last_time_ns, checked.last_energy_j, strict=True)
        state.last.update(zip(checked.keys, last, strict=True))
        state.devices.update(checked.devices)
        self.metrics.count_batch("stored")
        for name in checked.dropped:
            self.metrics.count_dropped(name)
        for note in checked.notes:
            log.info("%s", note)
        self.metrics.count_spans(len(checked.spans), checked.rejected_spans)
        self.metrics.add_stored(checked.samples, settled.energy, {checked.host.hostname: checked.power})
        if self.on_late_samples is not None and checked.first_time_ns:
            first = min(checked.first_time_ns)
            if first < self.clock_ns() - self.late_after_ns:
                self.on_late_samples(checked.host.hostname, first, max(checked.last_time_ns))
        return Outcome("stored", ack, instance_id)

    async def _write(self, state: _InstanceState, batch: StoredBatch, samples: int) -> WriteResult:
        try:
            return await self.writer.submit(batch, samples)
        except asyncio.CancelledError:
            state.reset()  # the write goes on without us: whether it is stored is the store's to say
            raise

    async def _reject(self, checked: Checked, state: _InstanceState, why: str) -> Outcome:
        instance_id = checked.instance_id
        log.warning("rejected batch %s/%d from %s: %s", instance_id, checked.sequence, checked.host.hostname, why)
        empty = StoredBatch(
            instance_id=instance_id,
            sequence=checked.sequence,
            oldest_pending_sequence=min(checked.oldest_pending_sequence, checked.sequence),
            host=checked.host,
            received_ns=checked.received_ns,
        )
        result = await self._write(state, empty, 0)
        self.store_error = None
        state.acked = result.acked_sequence
        self.metrics.count_batch("rejected")
        ack = pb.Ack(
            agent_instance_id=instance_id,
            acked_sequence=result.acked_sequence,
            rejected_sequence=checked.sequence,
            error=why,
        )
        return Outcome("rejected", ack, instance_id)

    def _settle(self, checked: Checked, state: _InstanceState, *, may_read: bool) -> _Settled | _Duplicate | str | None:
        """The batch against the instance's history: ``_DUPLICATE``, why it is refused, or ``_Settled``; the checks
        come in the order ``rules`` describes. What ``state`` does not hold is read from the store, unless not
        ``may_read``: then None, with nothing changed, when the store is needed."""
        instance_id = checked.instance_id
        if state.acked is None:
            if not may_read:
                return None
            state.reset()
            state.acked = self.store.acked_sequence(instance_id)
        if checked.sequence <= state.acked:
            return _DUPLICATE
        refusal = checked.refusal
        if refusal is not None and refusal.stage == STAGE_HEADER:
            return refusal.message
        in_total = checked.devices
        for device_id, where in checked.lookups:
            if not may_read and device_id not in state.devices:
                return None
            known = self._known_device(state, instance_id, checked.host.hostname, device_id)
            if known is None:
                return f"{where}: unknown device {device_id!r} (not in this batch, never sent by this agent)"
            if in_total is checked.devices:
                in_total = dict(in_total)
            in_total[device_id] = known
        if refusal is not None and refusal.stage < STAGE_POWER:
            return refusal.message
        steps: list[tuple[int, float]] = []  # (series, joules): a first sample's step from the last stored one
        held = state.last
        for series, (key, first_time, first_energy) in enumerate(
            zip(checked.keys, checked.first_time_ns, checked.first_energy_j, strict=True)
        ):
            previous = held.get(key, _UNKNOWN)
            if previous is _UNKNOWN:
                if not may_read:
                    return None
                previous = self._last(state, instance_id, key)
            if previous is not None:
                if first_time <= previous[0] or first_energy < previous[1]:
                    return f"{checked.where(series)}: {follow_error(first_time, first_energy, previous)}"
                steps.append((series, first_energy - previous[1]))
        if refusal is not None:
            return refusal.message
        assert checked.rows is not None
        rows = checked.rows
        rollups: list[RollupRow] = rows.rollups
        if steps:
            rollups = list(rollups)
            for series, joules in steps:
                index = checked.first_rollup[series]
                minute, device_id, bucket, within = rollups[index]
                rollups[index] = (minute, device_id, bucket, within + joules)
            rows = PackedBatch(rows.devices, rows.device_chunks, rows.workload_chunks, rollups, rows.workloads)
        hostname = checked.host.hostname
        energy: dict[tuple[str, str], float] = {}
        for _, device_id, workload, joules in rollups:
            if workload[0] and in_total[device_id]:  # a workload's (a device's own has workload "")
                label = (hostname, phase_label(workload[0], workload[1]))
                energy[label] = energy.get(label, 0.0) + joules
        stored = StoredBatch(
            instance_id=instance_id,
            sequence=checked.sequence,
            oldest_pending_sequence=checked.oldest_pending_sequence,
            host=checked.host,
            received_ns=checked.received_ns,
            raw_bytes=checked.size,
            packed=rows,
            spans=checked.spans,
            bindings=checked.bindings,
            steps=checked.steps,
            workload_labels=checked.labels,
        )
        return _Settled(stored, energy)

    def _last(self, state: _InstanceState, instance_id: str, key: SeriesKey) -> Last | None:
        if key in state.last:
            return state.last[key]
        stored = self.store.last_sample(instance_id, key[0], key[1])
        last = None if stored is None else (stored.time_ns, stored.energy_j)
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
