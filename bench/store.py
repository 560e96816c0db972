"""Store write throughput: device + workload samples per second one SQLite store takes, one transaction per batch.

A simulated fleet (default 100 hosts x 8 GPUs, 10 samples per device per batch, 3 workload series per GPU, and the
rollup increments ingest would add) is written from a thread pool, as the aggregator's gRPC handlers write, into a
fresh SQLite file (WAL, synchronous=FULL: each batch is on disk before its write returns).

    python -m bench.store [--hosts 100] [--seconds 20] [--threads 8] [--dir DIR] [--url postgresql://...]

Target (issue 4): at least 200,000 samples/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from collector.store import Store, open_store
from collector.store.base import DeviceChunk, HostInfo, RollupIncrement, StoredBatch, WorkloadChunk
from collector.store.sqlite import SqliteStore

GPUS = 8
SAMPLES = 10  # per device per batch: 1 s at 10 Hz
WORKLOADS_PER_GPU = 3
SAMPLE_NS = 100_000_000
MINUTE_NS = 60_000_000_000
T0_NS = 1_800_000_000 * 1_000_000_000
TARGET_SAMPLES_PER_S = 200_000


def fleet_batches(hosts: int, seconds: int, run_id: str = "") -> list[StoredBatch]:
    """Every host's batch for second 1, then every host's for second 2...: the order a fleet delivers them.
    ``run_id`` starts the agent instance ids, so a second run into one database is not taken for a replay."""
    offsets = np.arange(SAMPLES, dtype=np.int64) * SAMPLE_NS
    ramp = np.arange(1, SAMPLES + 1, dtype=np.float64)
    batches = []
    for second in range(seconds):
        start = T0_NS + second * SAMPLES * SAMPLE_NS
        time_ns = start + offsets
        minute = start - start % MINUTE_NS
        for host in range(hosts):
            devices = [
                DeviceChunk(
                    f"gpu{gpu}", "gpu", "simulated", True, time_ns, 30.0 * (second * SAMPLES + ramp), np.full(10, 300.0)
                )
                for gpu in range(GPUS)
            ]
            workloads = [
                WorkloadChunk(f"job-{host}-{w}", "training", f"slurm-{host}-{w}", f"gpu{gpu}", time_ns, 10.0 * ramp)
                for gpu in range(GPUS)
                for w in range(WORKLOADS_PER_GPU)
            ]
            rollups = [RollupIncrement(minute, f"gpu{gpu}", "", "", "", 300.0) for gpu in range(GPUS)] + [
                RollupIncrement(minute, c.device_id, c.workload, c.phase, c.job, 100.0) for c in workloads
            ]
            batches.append(
                StoredBatch(
                    instance_id=f"{run_id}agent-{host}",
                    sequence=second + 1,
                    # written by several threads, an agent's batches may land out of order: its spool holds every
                    # one until acknowledged (saying "nothing below this one" let the watermark pass a batch in
                    # flight, which then came as a duplicate)
                    oldest_pending_sequence=1,
                    host=HostInfo(f"host-{host:03d}", f"machine-{host}", "boot"),
                    received_ns=start + SAMPLES * SAMPLE_NS,
                    devices=devices,
                    workloads=workloads,
                    rollups=rollups,
                )
            )
    return batches


def samples_in(batch: StoredBatch) -> int:
    return sum(len(c.time_ns) for c in batch.devices) + sum(len(c.time_ns) for c in batch.workloads)


def run(
    hosts: int = 100, seconds: int = 20, threads: int = 8, directory: Path | None = None, url: str | None = None
) -> dict[str, float]:
    """Write ``seconds`` of a ``hosts``-host fleet into a fresh SQLite store (or the store ``url`` names, for a
    PostgreSQL figure); samples/s, per-batch latency and, on SQLite, bytes on disk per sample."""
    batches = fleet_batches(hosts, seconds, run_id=uuid.uuid4().hex[:8] + "-")
    workdir: Path | None = None
    if url is None:
        workdir = Path(tempfile.mkdtemp(prefix="wattmeter-bench-store-", dir=directory))
        store: Store = SqliteStore(workdir / "aggregator.db")
    else:
        store = open_store(url)
    try:
        store.migrate()

        def write(batch: StoredBatch) -> float:
            began = time.perf_counter()
            if not store.write_batch(batch).stored:
                raise RuntimeError(f"batch {batch.instance_id}/{batch.sequence} was taken for a duplicate")
            return time.perf_counter() - began

        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            latencies = np.array(list(pool.map(write, batches)))
        elapsed = time.perf_counter() - began
        samples = sum(samples_in(b) for b in batches)
        result = {
            "samples_per_s": samples / elapsed,
            "batches_per_s": len(batches) / elapsed,
            "samples": float(samples),
            "write_p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "write_p99_ms": float(np.percentile(latencies, 99) * 1e3),
        }
        if workdir is not None:
            result["bytes_per_sample"] = sum(f.stat().st_size for f in workdir.iterdir()) / samples
        return result
    finally:
        store.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=20, help="seconds of fleet telemetry to write")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="where the database goes (default: the temp dir)")
    parser.add_argument("--url", default=None, help="write into this store instead (postgresql://...)")
    args = parser.parse_args(argv)
    result = run(args.hosts, args.seconds, args.threads, args.dir, args.url)
    print(json.dumps(result, indent=2))
    passed = result["samples_per_s"] >= TARGET_SAMPLES_PER_S
    print(f"target >= {TARGET_SAMPLES_PER_S:,} samples/s: {'pass' if passed else 'MISS'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
