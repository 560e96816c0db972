"""Request spans end to end: a client process reports a span over the real agent's Unix socket, and the agent
streams it in Batch.spans to a small gRPC Telemetry servicer in the test, with the client's pid."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.proto import wattmeter_pb2 as pb
from tests.e2e.test_agent_process import REPO, AgentProcess, scrape
from tests.fakes.ports import free_port
from tests.fakes.telemetry import LoopbackServer, RecordingTelemetry, wait_until

CLIENT = """
import os, time
import collector.client as client
with client.request("e2e-req-1", model="llama-8b", tenant="acme", labels={"route": "chat"}) as r:
    r.started()
    r.prefill_done()
    r.tokens(input=17, output=42)
print(os.getpid(), client.spans_sent, client.spans_dropped, flush=True)
"""


@pytest.fixture
def servicer() -> RecordingTelemetry:
    return RecordingTelemetry()


@pytest.fixture
def aggregator(servicer: RecordingTelemetry) -> Iterator[LoopbackServer]:
    running = LoopbackServer(servicer)
    yield running
    running.stop()


def stream_agent_config(tmp_path: Path, port: int, target: str, hostname: str, extra: str = "") -> tuple[Path, Path]:
    """An agent config (written, and its socket's path): /metrics on ``port``, one simulated GPU, no real sources, its
    stream to ``target`` as ``hostname``; ``extra`` is TOML added at the end."""
    socket_path = tmp_path / "agent.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[prometheus]
listen = "127.0.0.1:{port}"
[sources.nvml]
enabled = false
[sources.rapl]
root = "{tmp_path / "no-rapl"}"
[sources.cpu_model]
enabled = false
[sources.simulated]
gpus = 1
interval_s = 0.1
[api]
socket = "{socket_path}"
[stream]
target = "{target}"
spool_dir = "{tmp_path / "spool"}"
batch_interval_s = 0.1
fsync = "never"
hostname = "{hostname}"
"""
        + extra
    )
    return config, socket_path


def test_a_clients_span_reaches_the_aggregator_with_its_pid(
    tmp_path: Path, aggregator: LoopbackServer, servicer: RecordingTelemetry
) -> None:
    port = free_port()
    config, socket_path = stream_agent_config(tmp_path, port, aggregator.target, "e2e-host")
    agent = AgentProcess(config)
    url = f"http://127.0.0.1:{port}"
    try:
        agent.wait_healthy(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
        env.update({"WATTMETER_SOCKET": str(socket_path), "PYTHONPATH": str(REPO)})
        result = subprocess.run(
            [sys.executable, "-c", CLIENT], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        pid, sent, dropped = (int(field) for field in result.stdout.split())
        assert (sent, dropped) == (1, 0)

        def spans() -> list[tuple[str, pb.RequestSpan]]:
            with servicer.lock:
                return [(b.host.hostname, s) for b in servicer.stored for s in b.spans]

        wait_until(lambda: bool(spans()), "the span in a batch")
        counts = {labels["result"]: value for labels, value in scrape(url)["wattmeter_request_spans_total"]}
        agent.proc.terminate()
        assert agent.proc.wait(10) == 0
    finally:
        agent.kill()
    ((host, span),) = spans()
    assert host == "e2e-host"
    assert span.pid == pid != os.getpid()  # from SO_PEERCRED: the client's own process
    assert (span.request_id, span.model, span.tenant, dict(span.labels)) == (
        "e2e-req-1",
        "llama-8b",
        "acme",
        {"route": "chat"},
    )
    assert (span.hostname, span.workload) == ("", "")  # the batch's host; the workload is found by the pid
    assert (span.input_tokens, span.output_tokens) == (17, 42)
    assert 0 < span.start_ns <= span.queue_end_ns <= span.prefill_end_ns <= span.end_ns
    assert counts == {"forwarded": 1.0, "dropped": 0.0, "refused": 0.0}
