"""Agent streaming overhead: spool bytes per hour per GPU, and the agent CPU that [stream] adds.

Two agents run side by side over the same window, alike but for ``[stream]``: 8 simulated GPUs and the fake RAPL
tree at 10 Hz, workload attribution on. The streaming one sends to a sink in this process that acks every batch
(``fsync = "always"``, the default, so every batch and every ack costs a disk sync). The sink counts the bytes of
every batch, which are the bytes the agent spooled (plus a 24-byte record header each).

``python -m bench.stream [--window S]``; not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    LOOPBACK,
    SAMPLE_INTERVAL_S,
    SIMULATED_GPUS,
    ManagedProcess,
    clean_env,
    cpu_delta,
    cpu_sample,
    free_port,
    machine_info,
    make_fake_rapl,
)
from collector.proto import wattmeter_pb2 as pb
from collector.spool import HEADER_BYTES

WINDOW_S = 60.0
WARMUP_S = 5.0


class Sink:
    """Acks every batch at once (the highest sequence seen per instance) and counts its bytes on the wire."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches = 0
        self.payload_bytes = 0
        self.device_samples = 0
        self.workload_samples = 0
        self.bindings = 0
        self.counting = False
        self.last: pb.Batch | None = None

    def stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for payload in requests:
            batch = pb.Batch.FromString(payload)
            with self.lock:
                if self.counting:
                    self.batches += 1
                    self.payload_bytes += len(payload)
                    self.device_samples += sum(len(s.time_ns) for s in batch.devices)
                    self.workload_samples += sum(len(s.time_ns) for s in batch.workloads)
                    self.bindings += len(batch.processes)
                self.last = batch
            ack = pb.Ack(agent_instance_id=batch.agent_instance_id, acked_sequence=batch.sequence)
            yield ack.SerializeToString()

    def server(self) -> tuple[grpc.Server, int]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            "wattmeter.v1.Telemetry", {"Stream": grpc.stream_stream_rpc_method_handler(self.stream)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port(f"{LOOPBACK}:0")
        server.start()
        return server, port


def start_agent(workdir: Path, rapl_root: Path, name: str, stream_target: str | None) -> ManagedProcess:
    port = free_port()
    config = workdir / f"{name}.toml"
    text = (
        'log_level = "warning"\n\n'
        f'[prometheus]\nlisten = "{LOOPBACK}:{port}"\n\n'
        "[sources.nvml]\nenabled = false\n\n"
        f'[sources.rapl]\nroot = "{rapl_root}"\ninterval_s = {SAMPLE_INTERVAL_S}\n\n'
        f"[sources.simulated]\ngpus = {SIMULATED_GPUS}\ninterval_s = {SAMPLE_INTERVAL_S}\n\n"
        f'[api]\nsocket = "{workdir / f"{name}.sock"}"\n\n'
        "[workloads]\nenabled = true\n"
    )
    if stream_target is not None:
        text += f'\n[stream]\ntarget = "{stream_target}"\nspool_dir = "{workdir / f"{name}-spool"}"\n'
    config.write_text(text)
    argv = [sys.executable, "-m", "collector", "agent", "--config", str(config)]
    agent = ManagedProcess(name, argv, workdir / f"{name}.log", port, "/healthz", env=clean_env())
    agent.wait_ready()
    return agent


def run(window_s: float = WINDOW_S, warmup_s: float = WARMUP_S) -> dict[str, Any]:
    sink = Sink()
    server, port = sink.server()
    with tempfile.TemporaryDirectory(prefix="wattmeter-bench-stream-") as tmp:
        workdir = Path(tmp)
        rapl = make_fake_rapl(workdir / "powercap")
        plain = start_agent(workdir, rapl.class_dir, "agent-plain", None)
        streaming = start_agent(workdir, rapl.class_dir, "agent-stream", f"{LOOPBACK}:{port}")
        try:
            time.sleep(warmup_s)
            before = {agent.name: cpu_sample(agent.pid) for agent in (plain, streaming)}
            with sink.lock:
                sink.counting = True
            time.sleep(window_s)
            with sink.lock:
                sink.counting = False
            cpu = {agent.name: cpu_delta(before[agent.name], cpu_sample(agent.pid)) for agent in (plain, streaming)}
            plain.check_alive()
            streaming.check_alive()
        finally:
            streaming.stop()
            plain.stop()
            server.stop(grace=None)
    wall_s = cpu["agent-stream"].wall_s
    spooled = sink.payload_bytes + HEADER_BYTES * sink.batches
    per_hour_per_gpu = spooled / wall_s * 3600 / SIMULATED_GPUS
    plain_cpu = cpu["agent-plain"].per_wall_s
    stream_cpu = cpu["agent-stream"].per_wall_s
    last = sink.last
    return {
        "benchmark": "stream",
        "window_s": round(wall_s, 2),
        "gpus": SIMULATED_GPUS,
        "sample_interval_s": SAMPLE_INTERVAL_S,
        "batches": sink.batches,
        "batches_per_s": round(sink.batches / wall_s, 3),
        "spool_bytes_per_hour_per_gpu": round(per_hour_per_gpu),
        "spool_mib_per_day_per_gpu": round(per_hour_per_gpu * 24 / 2**20, 2),
        "spool_bytes_per_batch": round(spooled / max(1, sink.batches)),
        "device_samples_per_s": round(sink.device_samples / wall_s, 1),
        "workload_samples_per_s": round(sink.workload_samples / wall_s, 1),
        "process_bindings": sink.bindings,
        "series_in_last_batch": {
            "devices": len(last.devices) if last else 0,
            "workloads": len(last.workloads) if last else 0,
        },
        "agent_cpu_s_per_s_without_stream": round(plain_cpu, 5),
        "agent_cpu_s_per_s_with_stream": round(stream_cpu, 5),
        "stream_extra_cpu_s_per_s": round(stream_cpu - plain_cpu, 5),
        "stream_extra_percent_of_one_core": round(100 * (stream_cpu - plain_cpu), 3),
        "cpu_method": cpu["agent-stream"].method,
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=WINDOW_S, help="measurement window in seconds")
    parser.add_argument("--warmup", type=float, default=WARMUP_S, help="seconds before the window starts")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.window, args.warmup), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
