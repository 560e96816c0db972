"""Request spans in the telemetry stream: queued by the exporter, put in the next batches within max_batch_bytes,
spooled and sent to a real gRPC servicer on loopback; and the agent's span counters."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.agent import Agent
from collector.config import AgentConfig, load_config
from collector.exporters.batching import MAX_PENDING_SPANS
from collector.exporters.grpc_stream import StreamExporter
from collector.proto import wattmeter_pb2 as pb
from collector.registration import SpanEvent
from collector.spool import SpoolError
from tests.fakes.ports import free_port
from tests.fakes.telemetry import (
    LoopbackServer,
    RecordingTelemetry,
    feed,
    spool_empty,
    static_sampler,
    stream_config,
    wait_until,
)

NOW = time.time_ns()


def span_event(request_id: str = "req-1", **fields: object) -> SpanEvent:
    values: dict[str, object] = {
        "pid": 4242,
        "uid": 1000,
        "gid": 1000,
        "request_id": request_id,
        "start_ns": NOW - 2_000_000_000,
        "end_ns": NOW - 1_000_000_000,
    }
    values.update(fields)
    return SpanEvent(**values)  # type: ignore[arg-type]


def spooled_batches(exporter: StreamExporter) -> list[pb.Batch]:
    return [pb.Batch.FromString(payload) for _, payload in exporter.spool.read_from(0)]


@pytest.fixture
def make_exporter(host_root: Path, tmp_path: Path) -> Iterator[Callable[..., StreamExporter]]:
    made: list[StreamExporter] = []

    def make(target: str = "127.0.0.1:9", **overrides: object) -> StreamExporter:
        exporter = StreamExporter(stream_config(tmp_path, target, **overrides), static_sampler(), host_root=host_root)
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.stop()


def test_a_span_reaches_the_aggregator_in_the_next_batch(
    server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    exporter = make_exporter(server.target)
    event = span_event(
        model="llama-70b",
        tenant="acme",
        workload="serve-a",
        labels={"route": "chat"},
        input_tokens=512,
        output_tokens=128,
        queue_end_ns=NOW - 1_900_000_000,
        prefill_end_ns=NOW - 1_800_000_000,
    )
    assert exporter.add_span(event)
    feed(exporter, 1.0, 10.0)
    assert exporter.flush() == 1  # the span rides with the readings
    exporter.start()
    wait_until(lambda: spool_empty(exporter), "the batch acked")
    (batch,) = servicer.stored
    assert batch.host.hostname == "host-a"
    assert {s.device_id for s in batch.devices} == {"gpu0", "cpu0", "cpu0-core", "dram0"}
    (span,) = batch.spans
    assert span == pb.RequestSpan(
        request_id="req-1",
        start_ns=NOW - 2_000_000_000,
        end_ns=NOW - 1_000_000_000,
        hostname="",  # the batch's host
        workload="serve-a",
        pid=4242,
        model="llama-70b",
        tenant="acme",
        labels={"route": "chat"},
        input_tokens=512,
        output_tokens=128,
        prefill_end_ns=NOW - 1_800_000_000,
        queue_end_ns=NOW - 1_900_000_000,
    )
    stats = exporter.stats()
    assert (stats.spans_forwarded, stats.spans_dropped, stats.spans_pending) == (1, 0, 0)


def test_spans_alone_make_a_batch(make_exporter: Callable[..., StreamExporter]) -> None:
    exporter = make_exporter()
    assert exporter.flush() == 0  # nothing at all: no batch
    exporter.add_span(span_event("a"))
    exporter.add_span(span_event("b"))
    assert exporter.flush() == 1
    (batch,) = spooled_batches(exporter)
    assert [s.request_id for s in batch.spans] == ["a", "b"]
    assert not batch.devices and not batch.workloads


def test_spans_past_a_batchs_bytes_spill_into_more_batches_none_over_max_batch_bytes(
    make_exporter: Callable[..., StreamExporter],
) -> None:
    limit = 64 * 1024
    exporter = make_exporter(max_batch_bytes=limit)
    for t in range(1200):  # readings that take most of the first batch's budget
        feed(exporter, t * 0.1, float(t))
    labels = {f"k{n}": "v" * 200 for n in range(16)}  # about 3.5 kB each: a few hundred kB in all
    count = 150
    for i in range(count):
        assert exporter.add_span(span_event(f"r{i:04d}", labels=labels, model="m" * 256))
    assert exporter.builder.cut.is_set()  # a batch's worth waits: the flusher need not wait for its interval
    spooled = exporter.flush()
    batches = spooled_batches(exporter)
    assert spooled == len(batches) >= 5
    assert all(batch.ByteSize() <= limit for batch in batches)
    ids = [s.request_id for b in batches for s in b.spans]
    assert ids == [f"r{i:04d}" for i in range(count)]  # each once, in the order they came
    assert [b.sequence for b in batches] == list(range(1, len(batches) + 1))
    assert exporter.stats().spans_forwarded == count


def test_spans_beyond_the_pending_cap_are_dropped_and_counted(make_exporter: Callable[..., StreamExporter]) -> None:
    exporter = make_exporter()
    assert exporter.spans.max_pending == MAX_PENDING_SPANS == 100_000
    exporter.spans.max_pending = 10  # the same bound, small enough to reach here
    results = [exporter.add_span(span_event(f"r{i}")) for i in range(15)]
    assert results == [True] * 10 + [False] * 5
    assert (exporter.stats().spans_dropped, exporter.stats().spans_pending) == (5, 10)
    exporter.flush()
    assert [s.request_id for b in spooled_batches(exporter) for s in b.spans] == [f"r{i}" for i in range(10)]
    assert exporter.add_span(span_event("after"))  # room again once flushed
    stats = exporter.stats()
    assert (stats.spans_forwarded, stats.spans_dropped, stats.spans_pending) == (10, 5, 1)


def test_spans_in_a_batch_the_spool_cannot_take_are_counted_dropped(
    make_exporter: Callable[..., StreamExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = make_exporter()

    def full(payload: bytes) -> int:
        raise SpoolError("spool disk full: cannot write (No space left on device)")

    monkeypatch.setattr(exporter.spool, "append", full)
    for i in range(3):
        exporter.add_span(span_event(f"r{i}"))
    assert exporter.flush() == 0
    stats = exporter.stats()
    assert (stats.spans_forwarded, stats.spans_dropped, stats.spans_pending, stats.dropped_batches) == (0, 3, 0, 1)


def test_spans_wait_in_the_spool_while_the_aggregator_is_away(
    tmp_path: Path, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    port = free_port()  # nobody on it yet
    exporter = make_exporter(f"127.0.0.1:{port}")
    exporter.add_span(span_event("kept"))
    exporter.flush()
    exporter.stop()  # an agent restart: the span is on disk, in a batch that will be replayed as it is
    second = make_exporter(f"127.0.0.1:{port}")
    server = LoopbackServer(servicer, port)
    try:
        second.start()
        wait_until(lambda: spool_empty(second), "the replay")
    finally:
        server.stop()
    assert [s.request_id for b in servicer.stored for s in b.spans] == ["kept"]


# --- the agent ---------------------------------------------------------------------------------------------------


def agent_config(tmp_path: Path, stream: dict[str, object] | None) -> AgentConfig:
    overrides: dict[str, object] = {
        "prometheus": {"listen": "127.0.0.1:0"},
        "sources": {
            "nvml": {"enabled": False},
            "rapl": {"root": str(tmp_path / "no-rapl")},
            "cpu_model": {"enabled": False},
            "simulated": {"gpus": 1, "interval_s": 0.05},
        },
        "api": {"socket": str(tmp_path / "agent.sock")},
    }
    if stream is not None:
        overrides["stream"] = stream
    return load_config(None, overrides, default_path=Path("/nonexistent/agent.toml"), environ={})


def span_counts(agent: Agent) -> dict[str, float]:
    agent.sampler.version += 1  # what every sampler read does: the exposition is rendered again
    body = agent.exporter.cache.body()
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "wattmeter_request_spans_total"
    }


def send_lines(path: Path, *lines: dict[str, object]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"".join(json.dumps(message).encode() + b"\n" for message in lines))


def span_message(request_id: str, **extra: object) -> dict[str, object]:
    return {
        "v": 1,
        "type": "span",
        "request_id": request_id,
        "start_ns": NOW - 2_000_000_000,
        "end_ns": NOW - 1_000_000_000,
        **extra,
    }


def test_the_agent_forwards_spans_from_its_socket_into_the_stream(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry
) -> None:
    config = agent_config(
        tmp_path,
        {"target": server.target, "spool_dir": str(tmp_path / "spool"), "batch_interval_s": 0.1, "fsync": "never"},
    )
    agent = Agent(config)
    assert agent.registration is not None and agent.stream is not None
    agent.registration.start()
    agent.stream.start()
    try:
        send_lines(agent.registration.socket_path, span_message("ok", model="m"), span_message("bad", end_ns=1))
        wait_until(lambda: any(b.spans for b in servicer.stored), "the span in a batch")
        counts = span_counts(agent)
    finally:
        agent.stream.stop()
        agent.registration.stop()
    (span,) = [s for b in servicer.stored for s in b.spans]
    assert (span.request_id, span.model, span.pid, span.hostname) == ("ok", "m", os.getpid(), "")
    assert counts == {"forwarded": 1.0, "dropped": 0.0, "refused": 1.0}


def test_without_a_stream_target_spans_are_counted_dropped(tmp_path: Path) -> None:
    agent = Agent(agent_config(tmp_path, None))
    assert agent.registration is not None and agent.stream is None
    agent.registration.start()
    try:
        send_lines(agent.registration.socket_path, span_message("a"), span_message("b"), span_message(""))
        registration = agent.registration
        wait_until(lambda: registration.spans_accepted + registration.spans_refused == 3, "the spans read")
        counts = span_counts(agent)
    finally:
        agent.registration.stop()
    assert counts == {"forwarded": 0.0, "dropped": 2.0, "refused": 1.0}
