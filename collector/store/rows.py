"""A batch as table rows, packed before any transaction starts (so the writer's lock is held for SQL alone).

Raw samples are little-endian int64 times and float64 values, one blob per array per chunk (``tobytes``). Ingest
may hand the store a batch already packed (``StoredBatch.packed``: its worker processes pack it from the wire bytes,
which are these blobs already), so the writer only binds the ids the database gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # base.py imports this module (StoredBatch.packed)
    from collector.store.base import Float64Array, Int64Array, StoredBatch

WorkloadKey = tuple[str, str, str]  # workload, phase, job; ("", "", "") is the device's own energy in rollups
DeviceRow = tuple[str, str, str, bool]  # device_id, kind, source, in_host_total
# device_id, t_start, t_end, sequence, time_ns, energy_j, power_w (None: no power in this chunk)
DeviceChunkRow = tuple[str, int, int, int, bytes, bytes, bytes | None]
WorkloadChunkRow = tuple[str, int, int, int, bytes, bytes]  # device_id, t_start, t_end, sequence, time_ns, energy_j
RollupRow = tuple[int, str, WorkloadKey, float]  # minute_ns, device_id, workload, joules


def pack_times(values: Int64Array) -> bytes:
    return np.ascontiguousarray(values, dtype="<i8").tobytes()


def pack_values(values: Float64Array) -> bytes:
    return np.ascontiguousarray(values, dtype="<f8").tobytes()


def unpack_times(blob: bytes) -> Int64Array:
    return np.frombuffer(blob, dtype="<i8").astype(np.int64)


def unpack_values(blob: bytes) -> Float64Array:
    return np.frombuffer(blob, dtype="<f8").astype(np.float64)


@dataclass(frozen=True)
class PackedBatch:
    """The rows of one batch, less the ids the database gives (host, agent instance, workload).

    Devices and rollups are sorted, so every writer takes row locks in the same order and two never deadlock.
    """

    devices: list[DeviceRow]
    device_chunks: list[DeviceChunkRow]
    workload_chunks: list[tuple[WorkloadKey, WorkloadChunkRow]]
    rollups: list[RollupRow]  # one per (minute, device, workload): increments to one bucket summed
    workloads: list[WorkloadKey]  # every workload named, sorted

    @property
    def has_data(self) -> bool:
        return bool(self.devices or self.workload_chunks or self.rollups)


def pack(batch: StoredBatch) -> PackedBatch:
    if batch.packed is not None:
        return batch.packed
    sequence = batch.sequence
    device_chunks: list[DeviceChunkRow] = [
        (
            chunk.device_id,
            int(chunk.time_ns[0]),
            int(chunk.time_ns[-1]),
            sequence,
            pack_times(chunk.time_ns),
            pack_values(chunk.energy_j),
            None if chunk.power_w is None else pack_values(chunk.power_w),
        )
        for chunk in batch.devices
        if len(chunk.time_ns)
    ]
    workload_chunks: list[tuple[WorkloadKey, WorkloadChunkRow]] = [
        (
            (chunk.workload, chunk.phase, chunk.job),
            (
                chunk.device_id,
                int(chunk.time_ns[0]),
                int(chunk.time_ns[-1]),
                sequence,
                pack_times(chunk.time_ns),
                pack_values(chunk.energy_j),
            ),
        )
        for chunk in batch.workloads
        if len(chunk.time_ns)
    ]
    increments: dict[tuple[int, str, WorkloadKey], float] = {}
    for rollup in batch.rollups:
        key = (rollup.minute_ns, rollup.device_id, (rollup.workload, rollup.phase, rollup.job))
        increments[key] = increments.get(key, 0.0) + rollup.energy_j
    workloads = {key for key, _ in workload_chunks}
    workloads.update(key for _, _, key in increments)
    return PackedBatch(
        devices=sorted({(c.device_id, c.kind, c.source, bool(c.in_host_total)) for c in batch.devices}),
        device_chunks=device_chunks,
        workload_chunks=workload_chunks,
        rollups=[(minute, device, key, joules) for (minute, device, key), joules in sorted(increments.items())],
        workloads=sorted(workloads),
    )
