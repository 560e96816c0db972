"""Review of the agent's side of request spans and steps from the client library (the registration socket):
hostile input on the socket must be refused there, never passed on to break what comes after it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.exporters.batching import span_message
from collector.proto import wattmeter_pb2 as pb
from collector.registration import RegistrationServer, SpanEvent
from tests.e2e.test_agent_process import AgentProcess, get, scrape
from tests.e2e.test_request_spans import stream_agent_config
from tests.exporters.test_stream_spans import agent_config
from tests.fakes.ports import free_port
from tests.fakes.registration_world import Recorder, connect, line
from tests.fakes.telemetry import LoopbackServer, RecordingTelemetry, wait_until
from tests.fakes.waiting import wait_for

LONE_SURROGATE = "\ud800"  # valid JSON ("\ud800" escaped), but no UTF-8 encodes it: protobuf and /metrics raise


def span_line(request_id: str = "req-1", **extra: object) -> bytes:
    now = time.time_ns()
    return line({"v": 1, "type": "span", "request_id": request_id, "start_ns": now - 5 * 10**9, "end_ns": now, **extra})


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(tmp_path: Path, recorder: Recorder) -> Iterator[RegistrationServer]:
    def forward(event: SpanEvent) -> None:
        span_message(event)  # what the agent's stream does with each accepted span
        recorder.on_span(event)

    running = RegistrationServer(
        tmp_path / "run" / "agent.sock",
        on_register=recorder.on_register,
        on_disconnect=recorder.on_disconnect,
        on_span=forward,
    )
    running.start()
    yield running
    running.stop()


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        pytest.param({"request_id": "r" + LONE_SURROGATE}, "request_id", id="request_id"),
        pytest.param({"model": LONE_SURROGATE}, "field", id="model"),
        pytest.param({"tenant": "t" + LONE_SURROGATE}, "field", id="tenant"),
        pytest.param({"labels": {"route": LONE_SURROGATE}}, "field", id="label-value"),
    ],
)
def test_a_span_with_a_lone_surrogate_is_refused_on_the_socket(
    server: RegistrationServer, recorder: Recorder, extra: dict[str, object], reason: str
) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(span_line(**extra) + span_line("good"))
        wait_for(lambda: recorder.spans)
    assert [span.request_id for span in recorder.spans] == ["good"]
    assert server.error_counts[reason] == 1
    assert (server.spans_refused, server.spans_accepted, server.callback_errors) == (1, 1, 0)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"job": "run" + LONE_SURROGATE}, id="job"),
        pytest.param({"labels": {"team": LONE_SURROGATE}}, id="label-value"),
    ],
)
def test_a_registration_with_a_lone_surrogate_is_refused(
    server: RegistrationServer, recorder: Recorder, extra: dict[str, object]
) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(line({"v": 1, "type": "register", "workload": "bad", **extra}))
        sock.sendall(line({"v": 1, "type": "register", "workload": "good", "labels": {"team": "é"}}))
        wait_for(lambda: recorder.events)
    assert [event.workload for event in recorder.events] == ["good"]
    assert server.error_counts["field"] == 1


def test_one_clients_lone_surrogate_stops_neither_the_stream_nor_metrics(tmp_path: Path) -> None:
    """The real agent: a register whose job holds a lone surrogate, then a good span. Accepted, the job made every
    later batch fail to build (the stream stopped for every workload) and /metrics fail to render."""
    servicer = RecordingTelemetry()
    aggregator = LoopbackServer(servicer)
    port = free_port()
    config, socket_path = stream_agent_config(
        tmp_path, port, aggregator.target, "review-host", extra="[workloads]\ninterval_s = 0.2\n"
    )
    agent = AgentProcess(config)
    url = f"http://127.0.0.1:{port}"
    try:
        agent.wait_healthy(url)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(socket_path))
            bad = {"v": 1, "type": "register", "workload": "w", "job": "j" + LONE_SURROGATE}
            sock.sendall(json.dumps(bad).encode() + b"\n" + span_line("bad", model=LONE_SURROGATE))
            time.sleep(1.0)  # a few scans and batches with the registration in force
            sock.sendall(span_line("good"))

            def spans() -> list[str]:
                with servicer.lock:
                    return [span.request_id for batch in servicer.stored for span in batch.spans]

            wait_until(lambda: bool(spans()), "the good span in a batch", timeout_s=15.0)
            assert get(url + "/metrics")[0] == 200
            counts = {labels["result"]: value for labels, value in scrape(url)["wattmeter_request_spans_total"]}
        assert spans() == ["good"]
        assert counts == {"forwarded": 1.0, "dropped": 0.0, "refused": 1.0}
    finally:
        agent.kill()
        aggregator.stop()


def test_a_span_accepted_during_shutdown_is_spooled_or_counted(tmp_path: Path) -> None:
    """The agent stopped the stream (its last flush) before the registration socket: a span accepted in between
    went to a queue nobody flushes any more, neither spooled nor counted as dropped."""
    from collector.agent import Agent
    from collector.spool import Spool

    spool_dir = tmp_path / "spool"
    # the aggregator is down: every batch stays in the spool
    stream_to: dict[str, object] = {"target": f"127.0.0.1:{free_port()}", "spool_dir": str(spool_dir), "fsync": "never"}
    agent = Agent(agent_config(tmp_path, stream_to))
    registration, stream = agent.registration, agent.stream
    assert registration is not None and stream is not None
    registration.start()
    agent._registration_up = True
    stream.start()
    stop_stream = stream.stop

    def stop_then_a_span_arrives(timeout_s: float = 0.5) -> None:
        stop_stream(timeout_s)
        try:
            with connect(registration.socket_path) as sock:
                sock.sendall(span_line("late"))
                wait_for(lambda: registration.spans_accepted == 2, timeout_s=2.0)
        except (OSError, AssertionError):
            pass  # the socket is closed already: the client counts the span as dropped itself

    stream.stop = stop_then_a_span_arrives  # type: ignore[method-assign]
    with connect(registration.socket_path) as sock:
        sock.sendall(span_line("early"))
        wait_for(lambda: registration.spans_accepted == 1)
    agent.shutdown()
    spool = Spool(spool_dir, fsync="never")
    try:
        spooled = [span.request_id for _, data in spool.read_from(0) for span in pb.Batch.FromString(data).spans]
    finally:
        spool.close()
    stats = stream.stats()
    assert "early" in spooled
    assert len(spooled) + stats.spans_dropped + agent.spans_unsent == registration.spans_accepted
