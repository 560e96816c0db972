"""7. Aggregator ingest: device + workload samples per second one ``wattmeter aggregator`` process stores (SQLite,
WAL, synchronous=FULL) from 100 simulated agents streaming over loopback gRPC. Target (issue 4): >= 200,000/s.

The agents live in one load-generator process (``python -m bench.ingest load ...``): 100 channels (one TCP
connection each, as 100 hosts would have), one ``Stream`` call per agent, up to ``INFLIGHT`` batches unacknowledged
per agent, each new batch sent as soon as an ack makes room. A batch is what a real agent sends each second: 8 GPUs
x 10 samples (10 Hz) and 3 workloads on every GPU (24 workload series of 10 samples), 320 samples, about 7 KB; times
and cumulative counters advance from one batch to the next, so every batch passes the aggregator's validation.
Batches are encoded by hand from constant per-agent pieces and numpy arrays (checked against the protobuf parser at
start): the generator shares the machine with the aggregator, so it must cost little.

The stored rate is read from the aggregator's own counters (``wattmeter_aggregator_stored_samples_total``) at both
ends of the window; its CPU from /proc, its check worker processes' included (``[ingest] workers``: the default, or
``WATTMETER_BENCH_INGEST_WORKERS``). A batch rejected or a storage error fails the benchmark: the figure would not
be an ingest rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import struct
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    LOOPBACK,
    BenchError,
    Context,
    ManagedProcess,
    Result,
    clean_env,
    cpu_delta,
    cpu_sample,
    free_port,
    http_get,
    stopping,
)

NAME = "ingest"
TARGET_SAMPLES_PER_S = 200_000
AGENTS = 100
GPUS = 8
SAMPLES = 10  # per series per batch: 1 s at 10 Hz
SAMPLE_NS = 100_000_000
WORKLOADS_PER_GPU = 3
WORKLOAD_SHARES = (0.5, 0.3, 0.1)  # of each GPU's energy; the rest is idle (not sent, as an agent would send it)
SAMPLES_PER_BATCH = GPUS * SAMPLES * (1 + WORKLOADS_PER_GPU)
INFLIGHT = 4  # per agent: a real agent allows 64; a few keep the aggregator's queue full without a long tail
# Batch times start this far back (an agent catching up after an outage sends a backlog like this) so that sending
# many seconds of telemetry per wall second never runs past the aggregator's max_future_s (300 s).
HISTORY_S = 1800
FUTURE_MARGIN_S = 200
WINDOW_S = {True: 10.0, False: 30.0}  # quick, full
CONNECT_TIMEOUT_S = 60.0
METHOD = "/wattmeter.v1.Telemetry/Stream"
WORKERS_ENV = "WATTMETER_BENCH_INGEST_WORKERS"  # set: the aggregator's [ingest] workers (else its default)


# --------------------------------------------------------------------------------------------------------------
# Batches, encoded by hand (protobuf wire format; field numbers from collector/proto/wattmeter.proto)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field_no: int, payload: bytes) -> bytes:
    return varint(field_no << 3 | 2) + varint(len(payload)) + payload


def varint_field(field_no: int, value: int) -> bytes:
    return varint(field_no << 3) + varint(value)


def fixed64_field(field_no: int, value: int) -> bytes:
    return varint(field_no << 3 | 1) + struct.pack("<Q", value)


ARRAY_BYTES = SAMPLES * 8
_PACKED = {n: varint(n << 3 | 2) + varint(ARRAY_BYTES) for n in (3, 4, 5, 6)}  # tag + length of a packed array


@dataclass
class SimAgent:
    """One simulated agent: its constant pieces and where its counters are."""

    index: int
    instance_id: str
    first_ns: int
    sequence: int = 0
    acked: int = 0
    power_w: np.ndarray[Any, np.dtype[np.float64]] = field(init=False)
    _head: bytes = field(init=False)
    _devices: list[tuple[bytes, bytes]] = field(init=False)  # (outer tag + length + constant fields, tail)
    _workloads: list[bytes] = field(init=False)  # outer tag + length + identity + device id
    _power: list[bytes] = field(init=False)  # each GPU's power array, packed (constant)
    _shares: np.ndarray[Any, np.dtype[np.float64]] = field(init=False)

    def __post_init__(self) -> None:
        from collector.proto import wattmeter_pb2 as pb

        host = pb.HostIdentity(
            hostname=f"bench-host-{self.index:03d}", machine_id=f"{self.index:032x}", boot_id=f"boot-{self.index}"
        )
        self._head = (
            varint_field(1, 1)
            + length_delimited(2, host.SerializeToString())
            + length_delimited(3, self.instance_id.encode())
        )
        self.power_w = 250.0 + 10.0 * np.arange(GPUS, dtype=np.float64) + self.index % 7
        self._power = [np.full(SAMPLES, watts).astype("<f8").tobytes() for watts in self.power_w]
        self._shares = np.array(WORKLOAD_SHARES)[None, :, None]
        self._devices = []
        for gpu in range(GPUS):
            constant = (
                length_delimited(1, f"gpu{gpu}".encode())
                + length_delimited(2, b"gpu")
                + length_delimited(3, b"simulated")
            )
            tail = varint_field(7, 1)  # in_host_total
            size = len(constant) + 3 * (len(_PACKED[4]) + ARRAY_BYTES) + len(tail)
            self._devices.append((varint(7 << 3 | 2) + varint(size) + constant, tail))
        self._workloads = []
        for gpu in range(GPUS):
            for w in range(WORKLOADS_PER_GPU):
                identity = pb.WorkloadIdentity(
                    workload=f"train-{self.index:03d}-{w}", phase="training", job=f"slurm-{self.index * 10 + w}"
                ).SerializeToString()
                constant = length_delimited(1, identity) + length_delimited(2, f"gpu{gpu}".encode())
                size = len(constant) + 2 * (len(_PACKED[3]) + ARRAY_BYTES)
                self._workloads.append(varint(8 << 3 | 2) + varint(size) + constant)

    def next_batch(self) -> bytes:
        """The next batch: 1 s more of samples, counters going on from the last batch."""
        self.sequence += 1
        n = (self.sequence - 1) * SAMPLES + np.arange(SAMPLES, dtype=np.float64)  # sample numbers since the start
        times = (
            self.first_ns + (self.sequence - 1) * SAMPLES * SAMPLE_NS + np.arange(SAMPLES, dtype=np.int64) * SAMPLE_NS
        )
        time_bytes = times.astype("<u8").tobytes()
        device_energy = np.outer(self.power_w, n * (SAMPLE_NS / 1e9))  # J, cumulative: power x elapsed time
        workload_energy = device_energy[:, None, :] * self._shares  # gpu x workload x sample
        # one conversion per array, then 80-byte slices: a batch costs tens of microseconds, not hundreds
        devices = memoryview(device_energy.astype("<f8").tobytes())
        workloads = memoryview(workload_energy.astype("<f8").tobytes())
        parts: list[bytes | memoryview] = [
            self._head,
            varint_field(4, self.sequence),
            fixed64_field(5, int(times[-1])),
            varint_field(6, self.acked + 1),  # the oldest batch not acknowledged yet
        ]
        for gpu, (head, tail) in enumerate(self._devices):
            at = gpu * ARRAY_BYTES
            parts += (
                head,
                _PACKED[4],
                time_bytes,
                _PACKED[5],
                devices[at : at + ARRAY_BYTES],
                _PACKED[6],
                self._power[gpu],
                tail,
            )
        for i, head in enumerate(self._workloads):
            at = i * ARRAY_BYTES
            parts += (head, _PACKED[3], time_bytes, _PACKED[4], workloads[at : at + ARRAY_BYTES])
        return b"".join(parts)

    def last_time_ns(self) -> int:
        return self.first_ns + self.sequence * SAMPLES * SAMPLE_NS


def check_encoding() -> None:
    """The hand-made bytes parse as the Batch they mean to be (a wrong tag would only show up as rejections)."""
    from collector.proto import wattmeter_pb2 as pb

    agent = SimAgent(7, "check", 1_700_000_000 * 10**9)
    agent.next_batch()
    batch = pb.Batch.FromString(agent.next_batch())
    if (
        batch.protocol_major != 1
        or batch.sequence != 2
        or batch.oldest_pending_sequence != 1
        or batch.host.hostname != "bench-host-007"
        or batch.agent_instance_id != "check"
        or len(batch.devices) != GPUS
        or len(batch.workloads) != GPUS * WORKLOADS_PER_GPU
        or list(batch.devices[1].time_ns) != [agent.first_ns + (SAMPLES + k) * SAMPLE_NS for k in range(SAMPLES)]
        or batch.devices[1].energy_j[0] != agent.power_w[1] * SAMPLES * SAMPLE_NS / 1e9
        or list(batch.devices[3].power_w) != [agent.power_w[3]] * SAMPLES
        or not batch.devices[0].in_host_total
        or batch.workloads[4].workload.workload != "train-007-1"
        or batch.workloads[4].device_id != "gpu1"
        or list(batch.workloads[4].time_ns) != list(batch.devices[1].time_ns)
        or abs(batch.workloads[4].energy_j[0] - batch.devices[1].energy_j[0] * WORKLOAD_SHARES[1]) > 1e-9
        or batch.created_ns != batch.devices[0].time_ns[-1]
    ):
        raise BenchError(f"the load generator's batch encoding is wrong:\n{batch}")


# --------------------------------------------------------------------------------------------------------------
# The load generator process


@dataclass
class Totals:
    batches_acked: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)  # send to ack, a sample of them


async def drive(agent: SimAgent, target: str, totals: Totals) -> None:
    """Stream ``agent``'s batches until cancelled (or the stream fails: recorded in ``totals``)."""
    import grpc

    from collector.proto import wattmeter_pb2 as pb

    # a local subchannel pool: a connection of its own per agent, as separate hosts have
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stream: grpc.aio.StreamStreamMultiCallable[bytes, pb.Ack] = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString
        )
        call = stream()
        room = asyncio.Semaphore(INFLIGHT)
        sent_at: deque[tuple[int, float]] = deque()

        async def read_acks() -> None:
            async for ack in call:
                if ack.rejected_sequence:
                    totals.rejected += 1
                    if len(totals.errors) < 5:
                        totals.errors.append(f"{agent.instance_id}/{ack.rejected_sequence}: {ack.error}")
                while sent_at and sent_at[0][0] <= ack.acked_sequence:
                    sequence, began = sent_at.popleft()
                    totals.batches_acked += 1
                    agent.acked = sequence
                    if sequence % 8 == 0:
                        totals.latencies_s.append(time.monotonic() - began)
                    room.release()

        reader = asyncio.create_task(read_acks())
        try:
            while not reader.done():
                await room.acquire()
                if agent.last_time_ns() >= time.time_ns() + FUTURE_MARGIN_S * 10**9:
                    room.release()  # too far ahead of the clock: let it catch up
                    await asyncio.sleep(0.5)
                    continue
                payload = agent.next_batch()
                sent_at.append((agent.sequence, time.monotonic()))
                await call.write(payload)
            await reader  # it ended: the stream failed
        except grpc.aio.AioRpcError as exc:
            totals.errors.append(f"{agent.instance_id}: {exc.code().name}: {exc.details()}")
        finally:
            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader


async def generate(target: str, agents: int, out: Path, max_s: float) -> None:
    check_encoding()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.call_later(max_s, stop.set)
    first_ns = time.time_ns() - HISTORY_S * 10**9
    sims = [SimAgent(i, f"bench-agent-{i:03d}-{first_ns}", first_ns + i * 1_000_000) for i in range(agents)]
    totals = Totals()
    started = time.monotonic()
    tasks = [asyncio.create_task(drive(sim, target, totals)) for sim in sims]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    report = {
        "agents": agents,
        "seconds": time.monotonic() - started,
        "batches_acked": totals.batches_acked,
        "samples_acked": totals.batches_acked * SAMPLES_PER_BATCH,
        "rejected": totals.rejected,
        "errors": totals.errors[:10],
        "ack_latency_p50_ms": 1e3 * statistics.median(totals.latencies_s) if totals.latencies_s else None,
        "ack_latency_p99_ms": 1e3 * float(np.percentile(totals.latencies_s, 99)) if totals.latencies_s else None,
        "batch_bytes": len(SimAgent(0, "x" * 36, first_ns).next_batch()),
    }
    out.write_text(json.dumps(report))


# --------------------------------------------------------------------------------------------------------------
# The benchmark


def start_aggregator(workdir: Path, attempts: int = 3) -> tuple[ManagedProcess, int]:
    """``wattmeter aggregator`` on a fresh SQLite file in ``workdir``; returns it and its gRPC port."""
    last_error: BenchError | None = None
    for attempt in range(attempts):
        grpc_port, http_port = free_port(), free_port()
        config = workdir / "aggregator.toml"
        config.write_text(
            'log_level = "warning"\n\n'
            f'[grpc]\nlisten = "{LOOPBACK}:{grpc_port}"\n\n'
            f'[http]\nlisten = "{LOOPBACK}:{http_port}"\n\n'
            f'[storage]\nurl = "sqlite:///{workdir / "aggregator.db"}"\n'
            + (f"\n[ingest]\nworkers = {os.environ[WORKERS_ENV]}\n" if WORKERS_ENV in os.environ else "")
        )
        argv = [sys.executable, "-m", "collector", "aggregator", "--config", str(config)]
        proc = ManagedProcess(
            "aggregator", argv, workdir / f"aggregator-{attempt}.log", http_port, "/healthz", env=clean_env()
        )
        try:
            proc.wait_ready()
            return proc, grpc_port
        except BenchError as exc:
            proc.stop()
            last_error = exc
            if "listen" not in str(exc) and "in use" not in str(exc):  # only a lost port race is worth another try
                break
    assert last_error is not None
    raise last_error


def aggregator_counters(port: int) -> dict[str, float]:
    """The aggregator's /metrics samples by name (labels folded into the name: ``name{result=stored}``)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(port, "/metrics", timeout_s=10.0)
    if status != 200:
        raise BenchError(f"aggregator /metrics: HTTP {status}")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/children") as handle:
            children += [int(child) for child in handle.read().split()]
    return sorted(children)


def wait_connected(aggregator: ManagedProcess, generator: ManagedProcess, agents: int) -> None:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        aggregator.check_alive()
        generator.check_alive()
        counters = aggregator_counters(aggregator.port)
        if (
            counters["wattmeter_aggregator_agents_connected"] >= agents
            and counters["wattmeter_aggregator_stored_samples_total"]
        ):
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{counters['wattmeter_aggregator_agents_connected']:g} of {agents} agents connected after "
                f"{CONNECT_TIMEOUT_S:g} s:\n{generator.log_tail()}"
            )
        time.sleep(0.2)


def run(ctx: Context) -> list[Result]:
    workdir = ctx.workdir / "ingest"
    workdir.mkdir()
    window_s = WINDOW_S[ctx.quick]
    aggregator, grpc_port = start_aggregator(workdir)
    with stopping(aggregator):
        report_path = workdir / "load.json"
        argv = [
            sys.executable, "-m", "bench.ingest", "load",
            "--target", f"{LOOPBACK}:{grpc_port}",
            "--agents", str(AGENTS),
            "--out", str(report_path),
            "--max-s", str(CONNECT_TIMEOUT_S + ctx.durations.warmup_s + window_s + 60),
        ]  # fmt: skip
        # not polled for readiness (no HTTP): the aggregator's connected-agents gauge says when it is up
        generator = ManagedProcess("load", argv, workdir / "load.log", 0, "", env=clean_env())
        with stopping(generator):
            wait_connected(aggregator, generator, AGENTS)
            time.sleep(ctx.durations.warmup_s)
            before = aggregator_counters(aggregator.port)
            workers = child_pids(aggregator.pid)  # its check worker processes
            cpu_before = cpu_sample(aggregator.pid), cpu_sample(generator.pid), [cpu_sample(p) for p in workers]
            time.sleep(window_s)
            after = aggregator_counters(aggregator.port)
            if child_pids(aggregator.pid) != workers:
                raise BenchError(f"the aggregator's worker processes changed during the window: {workers}")
            cpu_after = cpu_sample(aggregator.pid), cpu_sample(generator.pid), [cpu_sample(p) for p in workers]
            aggregator.check_alive()
            generator.check_alive()
        try:
            load: dict[str, Any] = json.loads(report_path.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"no report from the load generator ({exc}):\n{generator.log_tail()}") from exc
        db_bytes = sum(path.stat().st_size for path in workdir.glob("aggregator.db*"))
        final = aggregator_counters(aggregator.port)
    bad = {r: final[f"wattmeter_aggregator_batches_total{{result={r}}}"] for r in ("rejected", "error")}
    if any(bad.values()) or load["rejected"] or load["errors"]:
        raise BenchError(f"batches refused or failed: {bad}, load generator: {load}\n{aggregator.log_tail()}")

    process_cpu = cpu_delta(cpu_before[0], cpu_after[0])
    generator_cpu = cpu_delta(cpu_before[1], cpu_after[1])
    workers_cpu_s = sum(cpu_delta(b, a).cpu_s for b, a in zip(cpu_before[2], cpu_after[2], strict=True))
    wall_s = process_cpu.wall_s
    aggregator_cpu_s = process_cpu.cpu_s + workers_cpu_s
    stored = after["wattmeter_aggregator_stored_samples_total"] - before["wattmeter_aggregator_stored_samples_total"]
    batches = (
        after["wattmeter_aggregator_batches_total{result=stored}"]
        - before["wattmeter_aggregator_batches_total{result=stored}"]
    )
    commits = after["wattmeter_aggregator_store_commits_total"] - before["wattmeter_aggregator_store_commits_total"]
    rate = stored / wall_s
    setting = (
        f"{AGENTS} agents x ({GPUS} GPUs + {GPUS * WORKLOADS_PER_GPU} workload series) x {SAMPLES} samples per "
        f"batch, SQLite"
    )
    total_samples = final["wattmeter_aggregator_stored_samples_total"]
    return [
        Result(
            NAME,
            f"stored samples per second, one aggregator, {setting}",
            round(rate),
            "samples/s",
            f">= {TARGET_SAMPLES_PER_S:,}",
            rate >= TARGET_SAMPLES_PER_S,
            {
                "window_s": round(wall_s, 2),
                "stored_samples": stored,
                "stored_batches": batches,
                "batches_per_s": round(batches / wall_s, 1),
                "batches_per_store_commit": round(batches / max(commits, 1), 1),
                "load_generator": load,
            },
        ),
        Result(
            NAME,
            "aggregator CPU while ingesting (its check workers included), CPU-s per wall-s",
            round(aggregator_cpu_s / wall_s, 3),
            "CPU-s/s",
            details={
                "workers": len(workers),
                "process_cpu_s_per_wall_s": round(process_cpu.per_wall_s, 3),
                "workers_cpu_s_per_wall_s": round(workers_cpu_s / wall_s, 3),
                "process": process_cpu.to_json(),
            },
        ),
        Result(
            NAME,
            "aggregator CPU per stored sample",
            round(aggregator_cpu_s / max(stored, 1) * 1e6, 3),
            "us",
            details={"per_batch_us": round(aggregator_cpu_s / max(batches, 1) * 1e6, 1)},
        ),
        Result(
            NAME,
            "load generator CPU (same machine), CPU-s per wall-s",
            round(generator_cpu.per_wall_s, 3),
            "CPU-s/s",
            details=generator_cpu.to_json(),
        ),
        Result(
            NAME,
            "ack latency p50 / p99 (send to ack, 4 batches in flight per agent)",
            f"{load['ack_latency_p50_ms']:.1f} / {load['ack_latency_p99_ms']:.1f}",
            "ms",
        ),
        Result(
            NAME,
            "SQLite bytes per stored sample (raw chunks, rollups, indexes, WAL)",
            round(db_bytes / max(total_samples, 1), 1),
            "B",
            details={"db_bytes": db_bytes, "samples": total_samples},
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="the load generator: simulated agents streaming to an aggregator")
    load.add_argument("--target", required=True, help="the aggregator's gRPC host:port")
    load.add_argument("--agents", type=int, default=AGENTS)
    load.add_argument("--out", type=Path, required=True, help="where the JSON report goes at the end")
    load.add_argument("--max-s", type=float, default=600.0, help="stop after this long even without SIGTERM")
    args = parser.parse_args(argv)
    asyncio.run(generate(args.target, args.agents, args.out, args.max_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
