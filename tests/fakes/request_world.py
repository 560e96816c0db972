"""Hosts whose devices' power is an idle floor plus a known contribution per running request, written into a real
store as an agent's batches would be (10 Hz device and workload samples, counters quantised, 1-minute rollups),
and the requests' true energy to compare the engine with."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from collector.store.base import DeviceChunk, HostInfo, RollupIncrement, SpanRow, Store, StoredBatch, WorkloadChunk

S = 1_000_000_000
T0 = 1_800_000_000 * S  # a minute boundary
MINUTE = 60 * S
WORKLOAD = ("vllm", "inference", "")
IDLE = ("idle", "", "")
Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


@dataclass
class HostWriter:
    """One agent instance of one host: ``write`` stores a batch of device and workload counters."""

    store: Store
    hostname: str
    sequence: int = 0
    instance: str = field(default="")

    def write(
        self,
        device_id: str,
        kind: str,
        time_ns: Int64Array,
        device_j: Float64Array,
        power_w: Float64Array | None,
        workloads: dict[tuple[str, str, str], Float64Array],
        in_host_total: bool = True,
    ) -> None:
        self.sequence += 1
        chunks = [WorkloadChunk(*identity, device_id, time_ns, energy) for identity, energy in workloads.items()]
        rollups = [RollupIncrement(*r) for r in _rollups(device_id, time_ns, device_j, ("", "", ""))]
        for identity, energy in workloads.items():
            rollups += [RollupIncrement(*r) for r in _rollups(device_id, time_ns, energy, identity)]
        self.store.write_batch(
            StoredBatch(
                instance_id=self.instance or f"instance-{self.hostname}",
                sequence=self.sequence,
                oldest_pending_sequence=self.sequence,
                host=HostInfo(self.hostname),
                received_ns=int(time_ns[-1]),
                devices=[DeviceChunk(device_id, kind, "simulated", in_host_total, time_ns, device_j, power_w)],
                workloads=chunks,
                rollups=rollups,
            )
        )


def _rollups(
    device_id: str, time_ns: Int64Array, energy: Float64Array, identity: tuple[str, str, str]
) -> list[tuple[int, str, str, str, str, float]]:
    minute = time_ns - time_ns % MINUTE
    steps = np.diff(energy, prepend=energy[0])
    out = []
    for m in np.unique(minute):
        out.append((int(m), device_id, *identity, float(steps[minute == m].sum())))
    return out


@dataclass
class Simulation:
    """One GPU running ``WORKLOAD`` (which gets all of its energy: one process) from T0 for ``seconds``."""

    sample_ns: Int64Array
    counter_j: Float64Array
    power_w: Float64Array
    start_ns: Int64Array
    end_ns: Int64Array
    truth_j: Float64Array  # each request's true energy: (idle + per request) split equally among those running
    bound_j: Float64Array  # an error bound per request: one sample interval's power range over its time
    watts_events: tuple[Int64Array, Float64Array]


def simulate(
    seed: int,
    seconds: int = 60,
    concurrency: float = 3.0,
    idle_w: float = 70.0,
    per_request_w: float = 50.0,
    quantum_j: float = 1e-3,
    rate_hz: int = 10,
) -> Simulation:
    rng = np.random.default_rng(seed)
    mean_duration_s = 0.4 * 0.5 + 0.6 * 4.5
    n = max(2, int(concurrency * (seconds - 11) / mean_duration_s))
    duration_s = np.where(rng.random(n) < 0.4, rng.uniform(0.05, 1.0, n), rng.uniform(1.0, 8.0, n))
    start = T0 + (rng.uniform(1, seconds - 10, n) * S).astype(np.int64)
    end = start + (duration_s * S).astype(np.int64)
    events = np.unique(np.concatenate([[T0, T0 + seconds * S], start, end]))
    running = np.array([np.count_nonzero((start <= a) & (end >= b)) for a, b in itertools.pairwise(events)])
    watts = idle_w + per_request_w * running
    cumulative = np.concatenate([[0.0], np.cumsum(watts * np.diff(events) / S)])

    def piece(t: Int64Array) -> Int64Array:
        return np.minimum(np.searchsorted(events, t, side="right") - 1, watts.size - 1)

    step = S // rate_hz
    sample_ns = T0 + np.arange(0, seconds * S + 1, step) + rng.integers(-2_000_000, 2_000_000, seconds * rate_hz + 1)
    sample_ns[0], sample_ns[-1] = T0, T0 + seconds * S
    k = piece(sample_ns)
    counter = 5000.0 + np.floor((cumulative[k] + watts[k] * (sample_ns - events[k]) / S) / quantum_j) * quantum_j
    truth = np.zeros(n)
    for i, (a, b) in enumerate(itertools.pairwise(events)):
        if running[i]:
            truth[(start <= a) & (end >= b)] += watts[i] * (b - a) / S / running[i]
    bound = np.zeros(n)
    for a, b in itertools.pairwise(sample_ns):
        inside = watts[piece(np.array([a]))[0] : np.searchsorted(events, b, side="left")]
        spread = float(inside.max() - inside.min())
        overlap_s = np.clip(np.minimum(end, b) - np.maximum(start, a), 0, None) / S
        bound += (spread + quantum_j / ((b - a) / S)) * overlap_s
    return Simulation(sample_ns, counter, watts[k].astype(np.float64), start, end, truth, bound, (events, watts))


def write_simulation(
    writer: HostWriter, sim: Simulation, device_id: str = "gpu0", batch_s: float = 1.0, upto_ns: int | None = None
) -> None:
    """The simulation's samples as an agent sends them: one batch per ``batch_s`` of samples (up to ``upto_ns``)."""
    t, e, p = sim.sample_ns, sim.counter_j, sim.power_w
    keep = t <= (upto_ns if upto_ns is not None else t[-1])
    t, e, p = t[keep], e[keep], p[keep]
    edges = np.searchsorted(t, np.arange(int(t[0]), int(t[-1]) + 1, int(batch_s * S)), side="left")
    for lo, hi in itertools.pairwise([*edges.tolist(), t.size]):
        if hi > lo:
            # the workload has the GPU to itself: it gets all of the device's energy (from 0 at its start)
            workload = e[lo:hi] - sim.counter_j[0]
            writer.write(device_id, "gpu", t[lo:hi], e[lo:hi], p[lo:hi], {WORKLOAD: workload})


def spans_of(
    sim: Simulation,
    hostname: str = "host-a",
    prefix: str = "r",
    workload: str = "vllm",
    **fields: object,
) -> list[SpanRow]:
    return [
        SpanRow(f"{prefix}{i}", "s0", hostname, int(a), int(b), workload=workload, model="llama", **fields)  # type: ignore[arg-type]
        for i, (a, b) in enumerate(zip(sim.start_ns, sim.end_ns, strict=True))
    ]


def results(store: Store, ids: Sequence[str]) -> dict[str, object]:
    return {rid: store.request(rid) for rid in ids}
