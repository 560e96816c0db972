"""Energy per request end to end: a real aggregator (gRPC over loopback, SQLite) gets an agent's batches carrying
samples, a span by pid and its process binding, a span through ReportSpans, and vLLM-shaped spans exported by the
real OpenTelemetry SDK; its request engine makes them final with the energy the samples say."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from collector.proto import wattmeter_pb2 as pb
from collector.store.base import RequestResult
from tests.aggregator.conftest import RunningAggregator, base_config, batch, device, http_get, send, workload

S = 1_000_000_000
WAIT_S = 60.0


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[RunningAggregator]:
    running = RunningAggregator(base_config(tmp_path, requests={"interval_s": 0.1}))
    yield running
    running.stop()


def agent_batches(t0: int, seconds: int) -> list[pb.Batch]:
    """gpu0 at 200 W, all of it to workload vllm (one process, pid 4242), one batch per second."""
    out = []
    for n in range(seconds):
        times = [t0 + n * S + i * S // 10 for i in range(10)]
        joules = [200.0 * (t - t0) / S for t in times]
        one = batch(
            n + 1,
            [device("gpu0", times, [5000.0 + j for j in joules], [200.0] * 10)],
            [workload("vllm", "inference", "gpu0", times, joules)],
            host="gpu-01",
        )
        if n == 0:
            one.processes.append(
                pb.ProcessBinding(pid=4242, workload=pb.WorkloadIdentity(workload="vllm", phase="inference"))
            )
        out.append(one)
    return out


def wait_final(aggregator: RunningAggregator, request_id: str) -> RequestResult:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = aggregator.aggregator.store.request(request_id)
        if found is not None and found.status == "final":
            return found
        time.sleep(0.05)
    raise AssertionError(f"{request_id} is not final: {aggregator.aggregator.store.request(request_id)}")


def test_spans_from_batches_report_spans_and_otlp_get_their_energy(aggregator: RunningAggregator) -> None:
    t0 = (time.time_ns() - 30 * S) // S * S
    batches = agent_batches(t0, 12)
    # in a batch, found by pid: [1, 3] s alone
    batches[3].spans.append(
        pb.RequestSpan(request_id="by-pid", span_id="a", start_ns=t0 + S, end_ns=t0 + 3 * S, pid=4242)
    )
    with grpc.insecure_channel(aggregator.target) as channel:
        assert send(channel, batches).code is None
        report = channel.unary_unary(
            "/wattmeter.v1.Telemetry/ReportSpans",
            request_serializer=pb.SpanReport.SerializeToString,
            response_deserializer=pb.SpanReportResult.FromString,
        )
        # [4, 6] s, sharing [5, 6] s with the OTLP request below
        span = pb.RequestSpan(request_id="grpc-1", start_ns=t0 + 4 * S, end_ns=t0 + 6 * S, hostname="gpu-01",
                              workload="vllm", model="llama-8b", output_tokens=40)  # fmt: skip
        assert report(pb.SpanReport(spans=[span]), timeout=WAIT_S).accepted == 1

    # vLLM's llm_request span, exported by the real SDK: [5, 8] s, found by service.name
    provider = TracerProvider(resource=Resource.create({"host.name": "gpu-01", "service.name": "vllm"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=aggregator.target, insecure=True)))
    otel = provider.get_tracer("vllm.llm_engine").start_span(
        "llm_request",
        kind=SpanKind.SERVER,
        start_time=t0 + 5 * S,
        attributes={"gen_ai.request.id": "otlp-1", "gen_ai.response.model": "llama-8b",
                    "gen_ai.usage.prompt_tokens": 100, "gen_ai.usage.completion_tokens": 60},
    )  # fmt: skip
    otel.end(end_time=t0 + 8 * S)
    try:
        assert provider.force_flush(int(WAIT_S * 1000))
    finally:
        provider.shutdown()

    assert wait_final(aggregator, "by-pid").active_j == pytest.approx(400.0, rel=1e-9)
    # otlp-1 first: grpc-1 may be final (400 J alone) before the OTLP span arrives; the pass that finalises otlp-1
    # revises grpc-1 in the same write
    otlp_1 = wait_final(aggregator, "otlp-1")
    grpc_1 = wait_final(aggregator, "grpc-1")
    assert grpc_1.active_j == pytest.approx(200.0 + 100.0, rel=1e-9)
    assert otlp_1.active_j == pytest.approx(100.0 + 400.0, rel=1e-9)
    assert (otlp_1.model, otlp_1.input_tokens, otlp_1.output_tokens, otlp_1.hosts) == ("llama-8b", 100, 60, ("gpu-01",))
    assert grpc_1.joules_per_output_token == pytest.approx(300.0 / 40, rel=1e-9)
    # the engine counts a request on /metrics just after writing its result
    expected = (
        'wattmeter_requests_total{model="llama-8b",tenant=""} 2.0',
        'wattmeter_output_tokens_total{model="llama-8b"} 100.0',
        "wattmeter_requests_pending 0.0",
    )
    deadline = time.monotonic() + WAIT_S
    while True:
        status, body = http_get(aggregator.http_url + "/metrics")
        text = body.decode()
        if (status == 200 and all(line in text for line in expected)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200
    assert all(line in text for line in expected), text


def test_samples_replayed_after_the_grace_turn_an_approximate_request_final(tmp_path: Path) -> None:
    """An agent cut off from the aggregator spools its batches; the request its host served is finalised as
    approximate meanwhile (a lower bound). When the agent replays the spool, the late samples reopen it, and the
    engine computes it again from all of them."""
    running = RunningAggregator(base_config(tmp_path, requests={"interval_s": 0.1, "finalize_grace_s": 1.0}))
    try:
        t0 = (time.time_ns() - 30 * S) // S * S
        batches = agent_batches(t0, 12)
        span = pb.RequestSpan(request_id="cut-off", span_id="a", start_ns=t0 + 2 * S, end_ns=t0 + 8 * S,
                              hostname="gpu-01", workload="vllm")  # fmt: skip
        with grpc.insecure_channel(running.target) as channel:
            assert send(channel, batches[:4]).code is None  # samples of [0, 4) s, then the agent is cut off
            report = channel.unary_unary(
                "/wattmeter.v1.Telemetry/ReportSpans",
                request_serializer=pb.SpanReport.SerializeToString,
                response_deserializer=pb.SpanReportResult.FromString,
            )
            assert report(pb.SpanReport(spans=[span]), timeout=WAIT_S).accepted == 1
            store = running.aggregator.store
            deadline = time.monotonic() + WAIT_S
            while (found := store.request("cut-off")) is None or found.status != "approximate":
                assert time.monotonic() < deadline, found
                time.sleep(0.05)
            assert found.active_j is not None and found.active_j < 400.0  # [2, 4) s at most: a lower bound
            assert send(channel, batches[4:]).code is None  # the spool, replayed
        final = wait_final(running, "cut-off")
        assert final.active_j == pytest.approx(200.0 * 6, rel=1e-9)
    finally:
        running.stop()
