"""Energy per request end to end: spans per second through ``ReportSpans`` into SQLite, finalised, one aggregator.

``python -m bench.requests_e2e [--spans N]`` (or ``python -m bench.run --only requests``). A real ``wattmeter
aggregator`` process (SQLite WAL ``synchronous=FULL``, ``[requests] interval_s = 0.2``) first gets one host's
samples over gRPC (one agent stream: gpu0 at 10 Hz, all of it to workload vllm), then this process sends N spans of
that workload (0-2 s each, ~1,000 running at once, in the past so that their samples are there, in the order they
ended, as servers report them) through ``ReportSpans`` from 4 threads, 2,000 spans per call. The figure is N / (time
from the first span sent to every request counted final on /metrics): it includes storing the spans, finding them
pending, their neighbours, the split and writing the results. Target (issue 5): >= 100,000 spans/s. The load
generator shares the machine.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
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
from collector.proto import wattmeter_pb2 as pb

NS = 1_000_000_000
CONCURRENCY = 1_000
MAX_SPAN_S = 2.0
PER_CALL = 2_000
SENDERS = 4
SPANS = {True: 100_000, False: 500_000}  # quick, full
TARGET_SPANS_PER_S = 100_000.0
FINAL_TIMEOUT_S = 600.0
HOST = "bench-host"


def start_aggregator(workdir: Path) -> tuple[ManagedProcess, int]:
    grpc_port, http_port = free_port(), free_port()
    config = workdir / "aggregator.toml"
    config.write_text(
        'log_level = "warning"\n\n'
        f'[grpc]\nlisten = "{LOOPBACK}:{grpc_port}"\n\n'
        f'[http]\nlisten = "{LOOPBACK}:{http_port}"\n\n'
        f'[storage]\nurl = "sqlite:///{workdir / "aggregator.db"}"\nraw_retention = "1d"\n\n'
        "[requests]\ninterval_s = 0.2\n"
    )
    argv = [sys.executable, "-m", "collector", "aggregator", "--config", str(config)]
    proc = ManagedProcess("aggregator", argv, workdir / "aggregator.log", http_port, "/healthz", env=clean_env())
    proc.wait_ready()
    return proc, grpc_port


def sample_batches(t0: int, seconds: int) -> list[pb.Batch]:
    """One agent's batches: gpu0 at 300 W from ``t0`` for ``seconds``, all of it to workload vllm."""
    out = []
    for n in range(seconds):
        times = [t0 + n * NS + i * NS // 10 for i in range(10)]
        joules = [300.0 * (t - t0) / NS for t in times]
        out.append(
            pb.Batch(
                protocol_major=1,
                host=pb.HostIdentity(hostname=HOST),
                agent_instance_id="bench-instance",
                sequence=n + 1,
                created_ns=time.time_ns(),
                devices=[
                    pb.DeviceSeries(
                        device_id="gpu0",
                        kind="gpu",
                        source="simulated",
                        time_ns=times,
                        energy_j=[1e6 + j for j in joules],
                        power_w=[300.0] * 10,
                        in_host_total=True,
                    )
                ],
                workloads=[
                    pb.WorkloadSeries(
                        workload=pb.WorkloadIdentity(workload="vllm", phase="inference"),
                        device_id="gpu0",
                        time_ns=times,
                        energy_j=joules,
                    )
                ],
            )
        )
    return out


def reports(t0: int, spans: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    horizon_s = spans * (MAX_SPAN_S / 2) / CONCURRENCY
    start = t0 + NS + (rng.uniform(0, horizon_s, spans) * NS).astype(np.int64)
    end = start + (rng.uniform(0, MAX_SPAN_S, spans) * NS).astype(np.int64)
    # sent in the order they ended, as servers report them (a span is reported when its request is done)
    order = np.argsort(end, kind="stable")
    start, end = start[order], end[order]
    tokens = rng.integers(1, 1000, spans)
    out = []
    for lo in range(0, spans, PER_CALL):
        report = pb.SpanReport(
            spans=[
                pb.RequestSpan(request_id=f"r{i}", span_id="s", start_ns=int(start[i]), end_ns=int(end[i]),
                               hostname=HOST, workload="vllm", model="llama-8b", output_tokens=int(tokens[i]))
                for i in range(lo, min(lo + PER_CALL, spans))
            ]
        )  # fmt: skip
        out.append(report.SerializeToString())
    return out


def counted(port: int) -> float:
    status, body = http_get(port, "/metrics", timeout_s=10.0)
    if status != 200:
        raise BenchError(f"aggregator /metrics: HTTP {status}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("wattmeter_requests_total{") or line.startswith("wattmeter_requests_no_samples_total "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def measure(workdir: Path, spans: int) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    aggregator, grpc_port = start_aggregator(workdir)
    with stopping(aggregator):
        target = f"{LOOPBACK}:{grpc_port}"
        horizon_s = int(spans * (MAX_SPAN_S / 2) / CONCURRENCY + MAX_SPAN_S) + 4
        t0 = (time.time_ns() - (horizon_s + 5) * NS) // NS * NS
        payloads = reports(t0, spans)
        with grpc.insecure_channel(target) as channel:
            stream = channel.stream_stream("/wattmeter.v1.Telemetry/Stream", request_serializer=None,
                                           response_deserializer=pb.Ack.FromString)  # fmt: skip
            batches = [b.SerializeToString() for b in sample_batches(t0, horizon_s)]
            acks = list(stream(iter(batches), timeout=120))
            if not acks or acks[-1].acked_sequence != len(batches):
                raise BenchError(f"samples not stored: {acks[-1:] or 'no ack'}")
            call = channel.unary_unary("/wattmeter.v1.Telemetry/ReportSpans",
                                       response_deserializer=pb.SpanReportResult.FromString)  # fmt: skip
            rejected = 0
            lock = threading.Lock()

            def send(payload: bytes) -> None:
                nonlocal rejected
                result = call(payload, timeout=120)
                with lock:
                    rejected += result.rejected

            cpu_before = cpu_sample(aggregator.pid)
            started = time.monotonic()
            with ThreadPoolExecutor(SENDERS) as pool:
                list(pool.map(send, payloads))
            sent_s = time.monotonic() - started
            if rejected:
                raise BenchError(f"{rejected} spans rejected")
            deadline = started + FINAL_TIMEOUT_S
            while (done := counted(aggregator.port)) < spans:
                aggregator.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"{done:g} of {spans} requests final after {FINAL_TIMEOUT_S:g} s")
                time.sleep(0.05)
            final_s = time.monotonic() - started
            cpu = cpu_delta(cpu_before, cpu_sample(aggregator.pid))
    return {
        "spans": float(spans),
        "concurrency": float(CONCURRENCY),
        "stored_s": round(sent_s, 3),
        "stored_spans_per_s": round(spans / sent_s),
        "final_s": round(final_s, 3),
        "final_spans_per_s": round(spans / final_s),
        "aggregator_cpu_s": round(cpu.cpu_s, 3),
        "aggregator_cpu_us_per_span": round(1e6 * cpu.cpu_s / spans, 1),
    }


def run(ctx: Context) -> list[Result]:
    spans = SPANS[ctx.quick]
    figures = measure(ctx.workdir / "requests", spans)
    value = figures["final_spans_per_s"]
    return [
        Result(
            "requests",
            f"spans/s through ReportSpans into SQLite, finalised, one aggregator ({spans:,} spans, "
            f"~{CONCURRENCY:,} concurrent on one workload)",
            value,
            "spans/s",
            f">= {TARGET_SPANS_PER_S:,.0f}",
            value >= TARGET_SPANS_PER_S,
            details=figures,
        ),
        Result("requests", "spans/s stored (ReportSpans answered)", figures["stored_spans_per_s"], "spans/s"),
        Result("requests", "aggregator CPU per span, end to end", figures["aggregator_cpu_us_per_span"], "us"),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.requests_e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=SPANS[True])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        figures = measure(args.workdir or Path(directory), args.spans)
    for name, value in figures.items():
        print(f"  {name:<28} {value:g}")
    verdict = "pass" if figures["final_spans_per_s"] >= TARGET_SPANS_PER_S else "FAIL"
    print(f"  target final_spans_per_s >= {TARGET_SPANS_PER_S:g}: {verdict}")


if __name__ == "__main__":
    main()
