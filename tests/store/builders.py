"""Batches as ingest hands them to a store: device and workload chunks at 10 Hz, with their rollup increments."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from collector.store.base import DeviceChunk, HostInfo, RollupIncrement, StoredBatch, WorkloadChunk

T0_NS = 1_800_000_000 * 1_000_000_000  # a minute boundary (2027-01-15T08:00:00Z)
MINUTE_NS = 60_000_000_000
SAMPLE_NS = 100_000_000  # 10 Hz
SAMPLES = 10
GPU_W = 300.0
WORKLOAD_W = 100.0
TRAINING = ("train-llm", "training", "job-1")
INFERENCE = ("serve-llm", "inference", "job-2")


def times(start_ns: int, samples: int = SAMPLES) -> np.ndarray:
    return start_ns + np.arange(samples, dtype=np.int64) * SAMPLE_NS


def batch(
    sequence: int,
    *,
    instance: str = "instance-a",
    host: str = "host-1",
    oldest_pending: int | None = None,
    start_ns: int | None = None,
    devices: Sequence[tuple[str, bool]] = (("gpu0", True),),
    workloads: Sequence[tuple[str, str, str]] = (TRAINING,),
    counter_start_j: float = 1_000.0,
    power: bool = True,
    rollup_j: float | None = None,
) -> StoredBatch:
    """Batch ``sequence`` of an agent: 1 s of samples from ``start_ns`` (default: second ``sequence`` after T0).

    Device counters read ``counter_start_j`` + GPU_W x seconds since T0 (workload counters WORKLOAD_W x seconds);
    each device and workload gets one rollup increment of ``rollup_j`` (default: its energy in this batch) in the
    minute the batch starts.
    """
    start = T0_NS + (sequence - 1) * SAMPLES * SAMPLE_NS if start_ns is None else start_ns
    t = times(start)
    seconds = (t - T0_NS) / 1e9
    minute = start - start % MINUTE_NS
    device_chunks = [
        DeviceChunk(
            device_id=device_id,
            kind="gpu" if device_id.startswith("gpu") else "cpu",
            source="simulated",
            in_host_total=in_host_total,
            time_ns=t,
            energy_j=counter_start_j + GPU_W * seconds,
            power_w=np.full(SAMPLES, GPU_W) if power else None,
        )
        for device_id, in_host_total in devices
    ]
    workload_chunks = [
        WorkloadChunk(workload[0], workload[1], workload[2], device_id, t, WORKLOAD_W * seconds)
        for device_id, _ in devices
        for workload in workloads
    ]
    rollups = [
        RollupIncrement(
            minute, device_id, "", "", "", GPU_W * SAMPLES * SAMPLE_NS / 1e9 if rollup_j is None else rollup_j
        )
        for device_id, _ in devices
    ] + [
        RollupIncrement(
            minute,
            device_id,
            *workload,
            WORKLOAD_W * SAMPLES * SAMPLE_NS / 1e9 if rollup_j is None else rollup_j,
        )
        for device_id, _ in devices
        for workload in workloads
    ]
    return StoredBatch(
        instance_id=instance,
        sequence=sequence,
        oldest_pending_sequence=1 if oldest_pending is None else oldest_pending,
        host=HostInfo(host, machine_id=f"machine-{host}", boot_id="boot-1"),
        received_ns=start + SAMPLES * SAMPLE_NS,
        devices=device_chunks,
        workloads=workload_chunks,
        rollups=rollups,
    )


def rejected(sequence: int, *, instance: str = "instance-a", oldest_pending: int | None = None) -> StoredBatch:
    """What ingest stores for a batch it refused: nothing but its sequence."""
    return StoredBatch(
        instance_id=instance,
        sequence=sequence,
        oldest_pending_sequence=1 if oldest_pending is None else oldest_pending,
        host=HostInfo(""),
        received_ns=T0_NS,
    )
