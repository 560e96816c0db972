"""The OTLP/gRPC trace receiver: a real grpc.aio server on loopback, fed by the real OpenTelemetry SDK exporter and by
hand-built ExportTraceServiceRequests for every mapping rule and every refusal."""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from collector.aggregator.grpc_server import AuthPolicy
from collector.aggregator.otlp import (
    EXPORT_METHOD,
    IGNORED_REASONS,
    REJECTED_REASONS,
    SERVICE,
    OtlpCounts,
    TraceServicer,
    add_trace_service,
)
from collector.aggregator.spans import MAX_TEXT, span_error
from collector.exporters.exposition import TextRenderer
from collector.proto import wattmeter_pb2 as pb
from tests.aggregator.conftest import RunningAggregator, http_get

WAIT_S = 30.0  # generous: a loaded 2-core VM
NOW = 1_750_000_000 * 10**9  # the receiver's clock in the hand-built tests
START = NOW - 60 * 10**9
END = START + 2 * 10**9
MS = 1_000_000
TRACE_ID = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
SPAN_ID = bytes.fromhex("b7ad6b7169203331")
RESOURCE: dict[str, Any] = {"host.name": "gpu-01", "process.pid": 4242, "service.name": "vllm"}

# the attributes vLLM's OutputProcessor.do_tracing sets on its llm_request span (vllm/v1/engine/output_processor.py)
VLLM_ATTRIBUTES: dict[str, Any] = {
    "gen_ai.latency.time_to_first_token": 0.25,
    "gen_ai.latency.e2e": 2.0,
    "gen_ai.latency.time_in_queue": 0.05,
    "gen_ai.usage.prompt_tokens": 812,
    "gen_ai.usage.completion_tokens": 256,
    "gen_ai.latency.time_in_model_prefill": 0.15,
    "gen_ai.latency.time_in_model_decode": 1.7,
    "gen_ai.latency.time_in_model_inference": 1.85,
    "gen_ai.request.id": "chatcmpl-1",
    "gen_ai.response.finish_reasons": '["stop"]',
    "gen_ai.request.top_p": 0.9,
    "gen_ai.request.max_tokens": 256,
    "gen_ai.request.temperature": 0.7,
    "gen_ai.request.n": 1,
}


class Receiver:
    """A grpc.aio server with only the trace service, on its own event loop thread, recording what it is handed."""

    def __init__(
        self,
        allowed_hosts: Callable[[Mapping[str, Any], Any], frozenset[str] | None] | None = None,
        clock_ns: Callable[[], int] = lambda: NOW,
        fail: bool = False,
        sync_callback: bool = False,
    ) -> None:
        self.received: list[list[pb.RequestSpan]] = []
        self.fail = fail
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-otlp", daemon=True)
        self.thread.start()
        callback = self._take_sync if sync_callback else self._take
        self.servicer = TraceServicer(callback, allowed_hosts=allowed_hosts, clock_ns=clock_ns)
        self.server: grpc.aio.Server | None = None
        self.port: int = self._call(self._start())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT_S)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        add_trace_service(self.server, self.servicer)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def _take_sync(self, spans: list[pb.RequestSpan]) -> None:
        if self.fail:
            raise OSError("disk full")
        self.received.append(spans)

    async def _take(self, spans: list[pb.RequestSpan]) -> None:
        await asyncio.sleep(0)  # a real await: the servicer must await the callback's result
        self._take_sync(spans)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[pb.RequestSpan]:
        return [span for spans in self.received for span in spans]

    def counts(self) -> OtlpCounts:
        return self.servicer.counters.snapshot()

    def stop(self) -> None:
        if self.server is not None:
            self._call(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


@pytest.fixture
def start_receiver() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(**kwargs: Any) -> Receiver:
        receiver = Receiver(**kwargs)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver()


# -- hand-built OTLP messages


def any_value(value: Any) -> common_pb2.AnyValue:
    if isinstance(value, common_pb2.AnyValue):
        return value
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    if isinstance(value, str):
        return common_pb2.AnyValue(string_value=value)
    if isinstance(value, bytes):
        return common_pb2.AnyValue(bytes_value=value)
    if isinstance(value, list):
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[any_value(v) for v in value]))
    raise TypeError(value)


def key_values(attributes: Mapping[str, Any]) -> list[common_pb2.KeyValue]:
    return [common_pb2.KeyValue(key=key, value=any_value(value)) for key, value in attributes.items()]


def otlp_span(
    attributes: Mapping[str, Any] | None = None,
    name: str = "llm_request",
    start: int = START,
    end: int = END,
    kind: trace_pb2.Span.SpanKind.ValueType = trace_pb2.Span.SPAN_KIND_SERVER,
    trace_id: bytes = TRACE_ID,
    span_id: bytes = SPAN_ID,
) -> trace_pb2.Span:
    return trace_pb2.Span(
        trace_id=trace_id,
        span_id=span_id,
        name=name,
        kind=kind,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        attributes=key_values(VLLM_ATTRIBUTES if attributes is None else attributes),
    )


def export_request(
    spans: Sequence[trace_pb2.Span], resource: Mapping[str, Any] | None = None
) -> otlp.ExportTraceServiceRequest:
    return otlp.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(attributes=key_values(RESOURCE if resource is None else resource)),
                scope_spans=[
                    trace_pb2.ScopeSpans(
                        scope=common_pb2.InstrumentationScope(name="vllm.llm_engine"), spans=list(spans)
                    )
                ],
            )
        ]
    )


def export(
    target: str, request: otlp.ExportTraceServiceRequest, metadata: Sequence[tuple[str, str]] = ()
) -> otlp.ExportTraceServiceResponse:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=otlp.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=otlp.ExportTraceServiceResponse.FromString,
        )
        response: otlp.ExportTraceServiceResponse = call(request, timeout=WAIT_S, metadata=tuple(metadata))
        return response


def vllm(**changes: Any) -> dict[str, Any]:
    """vLLM's attributes with some changed; a value of None removes the attribute."""
    attributes = {**VLLM_ATTRIBUTES, **changes}
    return {key: value for key, value in attributes.items() if value is not None}


def expected_vllm_span(request_id: str = "chatcmpl-1", **changes: Any) -> pb.RequestSpan:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "start_ns": START,
        "end_ns": END,
        "hostname": "gpu-01",
        "pid": 4242,
        "service_name": "vllm",
        "input_tokens": 812,
        "output_tokens": 256,
        "prefill_end_ns": START + 250 * MS,  # start + time_to_first_token
        "queue_end_ns": START + 100 * MS,  # first token - time_in_model_prefill
        "span_id": SPAN_ID.hex(),  # the OTLP span id, in hex
    }
    fields.update(changes)
    return pb.RequestSpan(**fields)


# -- (1) the real OpenTelemetry SDK and its OTLP gRPC exporter


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_sdk_exporter_vllm_spans_are_mapped(start_receiver: Callable[..., Receiver], compression: str | None) -> None:
    receiver = start_receiver(clock_ns=time.time_ns)
    provider = TracerProvider(resource=Resource.create(RESOURCE | {"wattmeter.workload": "llama-8b"}))
    exporter = OTLPSpanExporter(
        endpoint=receiver.target,
        insecure=True,
        compression=grpc.Compression.Gzip if compression == "gzip" else None,
        timeout=int(WAIT_S),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("vllm.llm_engine")
    arrival = time.time_ns() - 10 * 10**9
    for index in range(2):
        start = arrival + index * 10**9
        span = tracer.start_span(
            "llm_request",
            kind=SpanKind.SERVER,
            start_time=start,
            attributes=vllm(
                **{"gen_ai.request.id": f"chatcmpl-{index}", "gen_ai.response.model": "meta-llama/Llama-3.1-8B"}
            ),
        )
        span.end(end_time=start + 2 * 10**9)
    # what vLLM's API server also traces, and an application's client span: neither is work on this host
    tracer.start_span("POST /v1/chat/completions", kind=SpanKind.SERVER, start_time=arrival).end(end_time=arrival + 1)
    client = tracer.start_span(
        "chat llama", kind=SpanKind.CLIENT, start_time=arrival, attributes={"gen_ai.usage.input_tokens": 5}
    )
    client.end(end_time=arrival + 1)
    try:
        assert provider.force_flush(int(WAIT_S * 1000))
    finally:
        provider.shutdown()

    expected = [
        pb.RequestSpan(
            request_id=f"chatcmpl-{index}",
            start_ns=arrival + index * 10**9,
            end_ns=arrival + index * 10**9 + 2 * 10**9,
            hostname="gpu-01",
            workload="llama-8b",
            pid=4242,
            service_name="vllm",
            model="meta-llama/Llama-3.1-8B",
            input_tokens=812,
            output_tokens=256,
            prefill_end_ns=arrival + index * 10**9 + 250 * MS,
            queue_end_ns=arrival + index * 10**9 + 100 * MS,
        )
        for index in range(2)
    ]
    received = sorted(receiver.spans, key=lambda s: s.request_id)
    for span in received:  # the SDK's random span ids, in hex
        assert len(span.span_id) == 16 and int(span.span_id, 16) != 0
        span.ClearField("span_id")
    assert received == expected
    counts = receiver.counts()
    assert counts.accepted == 2
    assert counts.ignored == {"not_llm": 1, "client_span": 1}
    assert sum(counts.rejected.values()) == 0


def test_sdk_exporter_with_a_bearer_token_and_no_host_name(start_receiver: Callable[..., Receiver]) -> None:
    """vLLM with no host.name in its resource: the one host its token is for is the span's host."""

    token_hash = "sha256:" + hashlib.sha256(b"s3cret").hexdigest()
    policy = AuthPolicy(mtls=False, token_hashes={"gpu-07": token_hash})
    receiver = start_receiver(allowed_hosts=policy.allowed_hosts, clock_ns=time.time_ns)
    provider = TracerProvider(resource=Resource.create({"service.name": "vllm"}))
    exporter = OTLPSpanExporter(
        endpoint=receiver.target, insecure=True, headers={"authorization": "Bearer s3cret"}, timeout=int(WAIT_S)
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    start = time.time_ns() - 5 * 10**9
    span = provider.get_tracer("vllm").start_span(
        "llm_request", kind=SpanKind.SERVER, start_time=start, attributes=vllm()
    )
    span.end(end_time=start + 2 * 10**9)
    try:
        assert provider.force_flush(int(WAIT_S * 1000))
    finally:
        provider.shutdown()
    assert [(s.request_id, s.hostname, s.pid) for s in receiver.spans] == [("chatcmpl-1", "gpu-07", 0)]


def test_bearer_token_policy(start_receiver: Callable[..., Receiver]) -> None:
    token_hash = "sha256:" + hashlib.sha256(b"s3cret").hexdigest()
    policy = AuthPolicy(mtls=False, token_hashes={"gpu-07": token_hash})
    receiver = start_receiver(allowed_hosts=policy.allowed_hosts)
    request = export_request([otlp_span()], resource={"host.name": "gpu-07"})

    with pytest.raises(grpc.RpcError) as refused:
        export(receiver.target, request)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no bearer token" in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as wrong:
        export(receiver.target, request, [("authorization", "Bearer nope")])
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert receiver.received == []

    other_host = otlp_span(vllm(**{"gen_ai.request.id": "elsewhere"}))
    both = export_request([otlp_span()], resource={"host.name": "gpu-07"})
    both.resource_spans.append(export_request([other_host], resource={"host.name": "gpu-08"}).resource_spans[0])
    response = export(receiver.target, both, [("authorization", "Bearer s3cret")])
    assert response.partial_success.rejected_spans == 1
    assert "host_not_allowed" in response.partial_success.error_message
    assert "'elsewhere'" in response.partial_success.error_message
    assert [(s.request_id, s.hostname) for s in receiver.spans] == [("chatcmpl-1", "gpu-07")]
    assert receiver.counts().rejected["host_not_allowed"] == 1


# -- (2) every mapping rule, hand-built


MAPPING_CASES: list[tuple[str, trace_pb2.Span, dict[str, Any] | None, pb.RequestSpan]] = [
    ("vllm", otlp_span(), None, expected_vllm_span()),
    (
        "request id from the trace and span ids",
        otlp_span(vllm(**{"gen_ai.request.id": None})),
        None,
        expected_vllm_span(f"{TRACE_ID.hex()}-{SPAN_ID.hex()}"),
    ),
    (
        "an empty request id falls back too",
        otlp_span(vllm(**{"gen_ai.request.id": ""})),
        None,
        expected_vllm_span(f"{TRACE_ID.hex()}-{SPAN_ID.hex()}"),
    ),
    (
        "newer token names win over the older",
        otlp_span(vllm(**{"gen_ai.usage.input_tokens": 900, "gen_ai.usage.output_tokens": 300})),
        None,
        expected_vllm_span(input_tokens=900, output_tokens=300),
    ),
    (
        "newer token names alone",
        otlp_span(
            vllm(
                **{
                    "gen_ai.usage.prompt_tokens": None,
                    "gen_ai.usage.completion_tokens": None,
                    "gen_ai.usage.input_tokens": 7,
                    "gen_ai.usage.output_tokens": 9,
                }
            )
        ),
        None,
        expected_vllm_span(input_tokens=7, output_tokens=9),
    ),
    (
        "token counts sent as integral doubles",
        otlp_span(vllm(**{"gen_ai.usage.prompt_tokens": 812.0, "gen_ai.usage.completion_tokens": 0.0})),
        None,
        expected_vllm_span(output_tokens=0),
    ),
    (
        "no token counts",
        otlp_span(vllm(**{"gen_ai.usage.prompt_tokens": None, "gen_ai.usage.completion_tokens": None})),
        None,
        expected_vllm_span(input_tokens=0, output_tokens=0),
    ),
    (
        "response model over request model",
        otlp_span(vllm(**{"gen_ai.response.model": "m-resp", "gen_ai.request.model": "m-req"})),
        None,
        expected_vllm_span(model="m-resp"),
    ),
    (
        "request model when no response model",
        otlp_span(vllm(**{"gen_ai.request.model": "m-req"})),
        None,
        expected_vllm_span(model="m-req"),
    ),
    (
        "queue time alone: queue end is start + queue",
        otlp_span(
            vllm(
                **{
                    "gen_ai.latency.time_to_first_token": None,
                    "gen_ai.latency.time_in_model_prefill": None,
                    "gen_ai.latency.time_in_model_decode": None,
                }
            )
        ),
        None,
        expected_vllm_span(queue_end_ns=START + 50 * MS, prefill_end_ns=0),
    ),
    (
        "prefill time alone: first token is start + prefill",
        otlp_span(
            vllm(
                **{
                    "gen_ai.latency.time_to_first_token": None,
                    "gen_ai.latency.time_in_queue": None,
                    "gen_ai.latency.time_in_model_decode": None,
                }
            )
        ),
        None,
        expected_vllm_span(queue_end_ns=0, prefill_end_ns=START + 150 * MS),
    ),
    (
        "queue and prefill, no TTFT or decode: first token is queue end + prefill",
        otlp_span(vllm(**{"gen_ai.latency.time_to_first_token": None, "gen_ai.latency.time_in_model_decode": None})),
        None,
        expected_vllm_span(queue_end_ns=START + 50 * MS, prefill_end_ns=START + 200 * MS),
    ),
    (
        "decode alone: first token is end - decode",
        otlp_span(
            vllm(
                **{
                    "gen_ai.latency.time_to_first_token": None,
                    "gen_ai.latency.time_in_queue": None,
                    "gen_ai.latency.time_in_model_prefill": None,
                }
            )
        ),
        None,
        expected_vllm_span(queue_end_ns=0, prefill_end_ns=END - 1700 * MS),
    ),
    (
        "decode and prefill, no TTFT: first token is end - decode, scheduled is first token - prefill",
        otlp_span(vllm(**{"gen_ai.latency.time_to_first_token": None})),
        None,
        expected_vllm_span(queue_end_ns=END - 1850 * MS, prefill_end_ns=END - 1700 * MS),
    ),
    (
        "decode and queue, no TTFT or prefill: queue end is start + queue",
        otlp_span(vllm(**{"gen_ai.latency.time_to_first_token": None, "gen_ai.latency.time_in_model_prefill": None})),
        None,
        expected_vllm_span(queue_end_ns=START + 50 * MS, prefill_end_ns=END - 1700 * MS),
    ),
    (
        "TTFT and decode: TTFT anchors the first token",
        otlp_span(vllm(**{"gen_ai.latency.time_in_model_decode": 0.5})),
        None,
        expected_vllm_span(queue_end_ns=START + 100 * MS, prefill_end_ns=START + 250 * MS),
    ),
    (
        "TTFT alone: first token, no queue end",
        otlp_span(vllm(**{"gen_ai.latency.time_in_queue": None, "gen_ai.latency.time_in_model_prefill": None})),
        None,
        expected_vllm_span(queue_end_ns=0, prefill_end_ns=START + 250 * MS),
    ),
    (
        "TTFT and prefill, no queue: scheduled is first token - prefill",
        otlp_span(vllm(**{"gen_ai.latency.time_in_queue": None})),
        None,
        expected_vllm_span(queue_end_ns=START + 100 * MS, prefill_end_ns=START + 250 * MS),
    ),
    (
        "TTFT and queue, no prefill: queue end is start + queue",
        otlp_span(vllm(**{"gen_ai.latency.time_in_model_prefill": None})),
        None,
        expected_vllm_span(queue_end_ns=START + 50 * MS, prefill_end_ns=START + 250 * MS),
    ),
    (
        "integer latencies",
        otlp_span(
            vllm(
                **{
                    "gen_ai.latency.time_to_first_token": 1,
                    "gen_ai.latency.time_in_model_prefill": 1,
                    "gen_ai.latency.time_in_queue": 0,
                }
            )
        ),
        None,
        expected_vllm_span(queue_end_ns=START, prefill_end_ns=START + 10**9),
    ),
    (
        "a first token within the 1 ms slack past the end is clamped to the end",
        otlp_span(vllm(**{"gen_ai.latency.time_to_first_token": 2.0005})),
        None,
        expected_vllm_span(queue_end_ns=END + MS // 2 - 150 * MS, prefill_end_ns=END),
    ),
    (
        "no latencies at all",
        otlp_span(
            {"gen_ai.request.id": "r", "gen_ai.usage.prompt_tokens": 3, "gen_ai.usage.completion_tokens": 4},
        ),
        None,
        pb.RequestSpan(
            request_id="r",
            span_id=SPAN_ID.hex(),
            start_ns=START,
            end_ns=END,
            hostname="gpu-01",
            pid=4242,
            service_name="vllm",
            input_tokens=3,
            output_tokens=4,
        ),
    ),
    (
        "workload and tenant from the resource",
        otlp_span(),
        RESOURCE | {"wattmeter.workload": "llama", "wattmeter.tenant": "acme"},
        expected_vllm_span(workload="llama", tenant="acme"),
    ),
    (
        "span attributes over resource attributes",
        otlp_span(vllm(**{"wattmeter.workload": "w-span", "wattmeter.tenant": "t-span", "host.name": "gpu-02"})),
        RESOURCE | {"wattmeter.workload": "w-res", "wattmeter.tenant": "t-res"},
        expected_vllm_span(workload="w-span", tenant="t-span", hostname="gpu-02"),
    ),
    (
        "no pid or service name",
        otlp_span(),
        {"host.name": "gpu-01"},
        expected_vllm_span(pid=0, service_name=""),
    ),
    (
        "another name with gen_ai.request.id",
        otlp_span({"gen_ai.request.id": "x"}, name="inference", kind=trace_pb2.Span.SPAN_KIND_INTERNAL),
        None,
        pb.RequestSpan(
            request_id="x",
            start_ns=START,
            end_ns=END,
            hostname="gpu-01",
            pid=4242,
            service_name="vllm",
            span_id=SPAN_ID.hex(),
        ),
    ),
    (
        "another name with gen_ai.usage.*, unspecified kind",
        otlp_span({"gen_ai.usage.output_tokens": 5}, name="generate", kind=trace_pb2.Span.SPAN_KIND_UNSPECIFIED),
        None,
        pb.RequestSpan(
            request_id=f"{TRACE_ID.hex()}-{SPAN_ID.hex()}",
            start_ns=START,
            end_ns=END,
            hostname="gpu-01",
            pid=4242,
            service_name="vllm",
            output_tokens=5,
            span_id=SPAN_ID.hex(),
        ),
    ),
    (
        "a zero-length span",
        otlp_span({"gen_ai.request.id": "z"}, end=START),
        None,
        pb.RequestSpan(
            request_id="z",
            start_ns=START,
            end_ns=START,
            hostname="gpu-01",
            pid=4242,
            service_name="vllm",
            span_id=SPAN_ID.hex(),
        ),
    ),
    (
        "text of exactly the longest length",
        otlp_span(vllm(**{"gen_ai.request.id": "r" * MAX_TEXT})),
        None,
        expected_vllm_span("r" * MAX_TEXT),
    ),
]


@pytest.mark.parametrize(
    ("span", "resource", "expected"),
    [case[1:] for case in MAPPING_CASES],
    ids=[case[0] for case in MAPPING_CASES],
)
def test_mapping(
    receiver: Receiver, span: trace_pb2.Span, resource: dict[str, Any] | None, expected: pb.RequestSpan
) -> None:
    response = export(receiver.target, export_request([span], resource))
    assert response == otlp.ExportTraceServiceResponse()  # no partial_success: everything taken
    assert receiver.received == [[expected]]
    # what the receiver takes, the aggregator's own span check takes too
    assert span_error(expected, expected.hostname, NOW + 300 * 10**9) is None
    assert receiver.counts().accepted == 1


def test_several_resources_and_scopes_in_one_export(receiver: Receiver) -> None:
    request = export_request([otlp_span(), otlp_span(vllm(**{"gen_ai.request.id": "b"}))])
    second = export_request([otlp_span(vllm(**{"gen_ai.request.id": "c"}))], {"host.name": "gpu-09"})
    request.resource_spans.extend(second.resource_spans)
    request.resource_spans[0].scope_spans.append(
        trace_pb2.ScopeSpans(spans=[otlp_span(vllm(**{"gen_ai.request.id": "d"}))])
    )
    export(receiver.target, request)
    assert len(receiver.received) == 1  # one call of the callback per Export
    assert [(s.request_id, s.hostname) for s in receiver.spans] == [
        ("chatcmpl-1", "gpu-01"),
        ("b", "gpu-01"),
        ("d", "gpu-01"),
        ("c", "gpu-09"),
    ]


# -- (2) every refusal, hand-built


def bad(**changes: Any) -> trace_pb2.Span:
    return otlp_span(vllm(**changes))


REJECTED_CASES: list[tuple[str, trace_pb2.Span, dict[str, Any] | None, str, str]] = [
    ("tokens as a string", bad(**{"gen_ai.usage.prompt_tokens": "812"}), None, "bad_attribute", "'812', not a count"),
    ("negative tokens", bad(**{"gen_ai.usage.completion_tokens": -1}), None, "bad_attribute", "-1, not a count"),
    ("fractional tokens", bad(**{"gen_ai.usage.input_tokens": 1.5}), None, "bad_attribute", "1.5, not a count"),
    ("NaN tokens", bad(**{"gen_ai.usage.output_tokens": math.nan}), None, "bad_attribute", "nan, not a count"),
    ("huge double tokens", bad(**{"gen_ai.usage.output_tokens": 1e300}), None, "bad_attribute", "not a count"),
    ("bool tokens", bad(**{"gen_ai.usage.prompt_tokens": True}), None, "bad_attribute", "True, not a count"),
    ("array tokens", bad(**{"gen_ai.usage.prompt_tokens": [1, 2]}), None, "bad_attribute", "a array_value"),
    ("request id as an int", bad(**{"gen_ai.request.id": 7}), None, "bad_attribute", "7, not a string"),
    (
        "request id too long",
        bad(**{"gen_ai.request.id": "r" * (MAX_TEXT + 1)}),
        None,
        "text_too_long",
        f"gen_ai.request.id is longer than {MAX_TEXT}",
    ),
    ("model as bytes", bad(**{"gen_ai.response.model": b"m"}), None, "bad_attribute", "b'm', not a string"),
    ("tenant too long", bad(**{"wattmeter.tenant": "t" * 300}), None, "text_too_long", "wattmeter.tenant"),
    ("workload as an array", bad(**{"wattmeter.workload": ["a"]}), None, "bad_attribute", "wattmeter.workload"),
    (
        "latency as a string",
        bad(**{"gen_ai.latency.time_in_queue": "0.05"}),
        None,
        "bad_attribute",
        "'0.05', not seconds",
    ),
    ("negative latency", bad(**{"gen_ai.latency.time_in_model_prefill": -0.1}), None, "bad_attribute", "-0.1 s"),
    ("NaN latency", bad(**{"gen_ai.latency.time_to_first_token": math.nan}), None, "bad_attribute", "nan s"),
    ("infinite latency", bad(**{"gen_ai.latency.time_in_queue": math.inf}), None, "bad_attribute", "inf s"),
    ("a latency of years", bad(**{"gen_ai.latency.time_in_queue": 1e9}), None, "bad_attribute", "not a latency"),
    ("pid 0", otlp_span(), RESOURCE | {"process.pid": 0}, "bad_attribute", "process.pid is 0"),
    ("pid too large", otlp_span(), RESOURCE | {"process.pid": 2**32}, "bad_attribute", "not a process id"),
    ("pid as a string", otlp_span(), RESOURCE | {"process.pid": "4242"}, "bad_attribute", "not a process id"),
    ("host name as an int", otlp_span(), RESOURCE | {"host.name": 1}, "bad_attribute", "host.name is 1"),
    ("no host name", otlp_span(), {"service.name": "vllm"}, "no_hostname", "OTEL_RESOURCE_ATTRIBUTES"),
    ("end before start", otlp_span(end=START - 1), None, "end_before_start", "is before start_time_unix_nano"),
    ("no start time", otlp_span(start=0), None, "absurd_time", "start_time_unix_nano 0 is before 2000"),
    ("a start in 1990", otlp_span(start=631_152_000 * 10**9), None, "absurd_time", "before 2000"),
    (
        "times in microseconds",
        otlp_span(start=START // 1000, end=END // 1000),
        None,
        "absurd_time",
        "before 2000",
    ),
    (
        "an end in the future",
        otlp_span(start=NOW, end=NOW + 301 * 10**9),
        None,
        "in_future",
        "in the future",
    ),
    (
        "a request of more than a day",
        otlp_span(start=NOW - 86_401 * 10**9, end=NOW),
        None,
        "duration_too_long",
        "86401 s",
    ),
    (
        "first token past the end",
        bad(**{"gen_ai.latency.time_to_first_token": 2.5, "gen_ai.latency.time_in_queue": None}),
        None,
        "latency_outside_span",
        "first token from the latencies is 0.500000 s past the end",
    ),
    (
        "queue and prefill past the end",
        bad(
            **{
                "gen_ai.latency.time_to_first_token": None,
                "gen_ai.latency.time_in_queue": 1.5,
                "gen_ai.latency.time_in_model_prefill": 0.6,
                "gen_ai.latency.time_in_model_decode": None,
            }
        ),
        None,
        "latency_outside_span",
        "first token from the latencies is 0.100000 s past the end",
    ),
    (
        "queue alone past the end",
        bad(
            **{
                "gen_ai.latency.time_to_first_token": None,
                "gen_ai.latency.time_in_model_prefill": None,
                "gen_ai.latency.time_in_queue": 3.0,
                "gen_ai.latency.time_in_model_decode": None,
            }
        ),
        None,
        "latency_outside_span",
        "queue end",
    ),
    (
        "decode longer than the span",
        bad(**{"gen_ai.latency.time_to_first_token": None, "gen_ai.latency.time_in_model_decode": 2.5}),
        None,
        "latency_inconsistent",
        "time_in_model_decode is longer than the span",
    ),
    (
        "prefill longer than end - decode",
        bad(
            **{
                "gen_ai.latency.time_to_first_token": None,
                "gen_ai.latency.time_in_model_decode": 1.9,
                "gen_ai.latency.time_in_queue": None,
            }
        ),
        None,
        "latency_inconsistent",
        "time_in_model_prefill is longer than the span's time to its end - gen_ai.latency.time_in_model_decode",
    ),
    (
        "prefill longer than TTFT",
        bad(**{"gen_ai.latency.time_in_model_prefill": 0.3, "gen_ai.latency.time_in_queue": None}),
        None,
        "latency_inconsistent",
        "time_in_model_prefill is longer than gen_ai.latency.time_to_first_token",
    ),
    (
        "queue + prefill longer than TTFT",
        bad(**{"gen_ai.latency.time_in_queue": 0.2}),
        None,
        "latency_inconsistent",
        "time_in_queue + gen_ai.latency.time_in_model_prefill is longer",
    ),
    (
        "queue longer than TTFT",
        bad(**{"gen_ai.latency.time_in_queue": 0.3, "gen_ai.latency.time_in_model_prefill": None}),
        None,
        "latency_inconsistent",
        "time_in_queue is longer than gen_ai.latency.time_to_first_token",
    ),
    (
        "no request id and no trace id",
        otlp_span(vllm(**{"gen_ai.request.id": None}), trace_id=bytes(16)),
        None,
        "no_request_id",
        "no gen_ai.request.id and no valid trace and span ids",
    ),
    (
        "no request id and a short span id",
        otlp_span(vllm(**{"gen_ai.request.id": None}), span_id=b"\x01\x02"),
        None,
        "no_request_id",
        "no valid trace and span ids",
    ),
]


@pytest.mark.parametrize(
    ("span", "resource", "reason", "message"),
    [case[1:] for case in REJECTED_CASES],
    ids=[case[0] for case in REJECTED_CASES],
)
def test_rejected(
    receiver: Receiver, span: trace_pb2.Span, resource: dict[str, Any] | None, reason: str, message: str
) -> None:
    request = export_request([otlp_span(vllm(**{"gen_ai.request.id": "good"}))])  # its own resource
    request.resource_spans.extend(export_request([span], resource).resource_spans)
    response = export(receiver.target, request)
    assert response.partial_success.rejected_spans == 1
    assert f"1 span(s) rejected (1 {reason}): " in response.partial_success.error_message
    assert message in response.partial_success.error_message
    assert [s.request_id for s in receiver.spans] == ["good"]  # the bad span costs itself only
    counts = receiver.counts()
    assert counts.rejected == {r: int(r == reason) for r in REJECTED_REASONS}
    assert counts.accepted == 1


def test_rejected_spans_name_their_request(receiver: Receiver) -> None:
    response = export(receiver.target, export_request([bad(**{"gen_ai.usage.prompt_tokens": "x"})]))
    assert response.partial_success.error_message == (
        "1 span(s) rejected (1 bad_attribute): request 'chatcmpl-1': gen_ai.usage.prompt_tokens is 'x', not a count"
    )
    assert receiver.received == []  # nothing taken: the callback is not called with an empty list


def test_many_rejections_are_summed_and_the_message_stays_short(receiver: Receiver) -> None:
    spans = [otlp_span(vllm(**{"gen_ai.request.id": f"r{i}"}), end=START - 1) for i in range(7)]
    spans += [bad(**{"gen_ai.latency.time_in_queue": -1.0}) for _ in range(3)]
    response = export(receiver.target, export_request(spans))
    partial = response.partial_success
    assert partial.rejected_spans == 10
    assert partial.error_message.startswith("10 span(s) rejected (3 bad_attribute, 7 end_before_start): ")
    assert partial.error_message.count("is before start_time_unix_nano") == 5
    assert partial.error_message.endswith("; and 5 more")
    assert receiver.received == []
    counts = receiver.counts()
    assert (counts.rejected["end_before_start"], counts.rejected["bad_attribute"], counts.accepted) == (7, 3, 0)


# -- (3) spans that are not LLM requests


def test_other_spans_are_ignored_not_rejected(receiver: Receiver) -> None:
    spans = [
        otlp_span({"http.route": "/health"}, name="GET /health"),
        otlp_span({"gen_ai.request.model": "m"}, name="chat m", kind=trace_pb2.Span.SPAN_KIND_INTERNAL),
        otlp_span({}, name="llm_core", kind=trace_pb2.Span.SPAN_KIND_INTERNAL),
        otlp_span(name="llm_request", kind=trace_pb2.Span.SPAN_KIND_CLIENT),  # a caller's view of a request
        otlp_span({"gen_ai.usage.input_tokens": 3}, name="chat", kind=trace_pb2.Span.SPAN_KIND_CLIENT),
        otlp_span({"gen_ai.usage.input_tokens": "junk"}, name="db", end=0, trace_id=b""),  # taken, then rejected
    ]
    response = export(receiver.target, export_request(spans, resource={}))
    assert response.partial_success.rejected_spans == 1
    assert receiver.received == []
    counts = receiver.counts()
    assert counts.ignored == {"not_llm": 3, "client_span": 2}
    assert counts.rejected["no_request_id"] == 1
    assert counts.accepted == 0


def test_only_ignored_spans_answer_plain_success(receiver: Receiver) -> None:
    response = export(receiver.target, export_request([otlp_span({"a": 1}, name="x")]))
    assert response == otlp.ExportTraceServiceResponse()
    assert not response.HasField("partial_success")
    assert receiver.received == []
    assert receiver.counts().ignored["not_llm"] == 1


def test_an_empty_export(receiver: Receiver) -> None:
    assert export(receiver.target, otlp.ExportTraceServiceRequest()) == otlp.ExportTraceServiceResponse()
    assert receiver.received == []
    assert receiver.counts().exports == 1


# -- the call itself


def test_garbage_bytes_are_invalid_argument(receiver: Receiver) -> None:
    with grpc.insecure_channel(receiver.target) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(EXPORT_METHOD)
        with pytest.raises(grpc.RpcError) as error:
            call(b"\xff\xff\xff\xff not protobuf", timeout=WAIT_S)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an ExportTraceServiceRequest" in (error.value.details() or "")
    assert receiver.counts().exports == 0


def test_a_failing_callback_answers_unavailable_so_the_sender_retries(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(fail=True)
    with pytest.raises(grpc.RpcError) as error:
        export(receiver.target, export_request([otlp_span(), otlp_span({"x": 1}, name="other")]))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not take the spans: disk full" in (error.value.details() or "")
    counts = receiver.counts()
    # the sender sends the whole request again: nothing of it is counted but the error
    assert (counts.errors, counts.accepted, counts.ignored["not_llm"], counts.exports) == (1, 0, 0, 0)


def test_a_sync_callback(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(sync_callback=True)
    export(receiver.target, export_request([otlp_span()]))
    assert receiver.received == [[expected_vllm_span()]]


def test_counters_render_as_one_family(receiver: Receiver) -> None:
    export(receiver.target, export_request([otlp_span(), otlp_span({}, name="x"), otlp_span(end=START - 1)]))
    text = TextRenderer().render(receiver.servicer.counters.families()).decode()
    assert 'wattmeter_aggregator_otlp_spans_total{reason="",result="accepted"} 1.0' in text
    assert 'wattmeter_aggregator_otlp_spans_total{reason="not_llm",result="ignored"} 1.0' in text
    assert 'wattmeter_aggregator_otlp_spans_total{reason="end_before_start",result="rejected"} 1.0' in text
    assert 'wattmeter_aggregator_otlp_spans_total{reason="in_future",result="rejected"} 0.0' in text
    assert 'wattmeter_aggregator_otlp_spans_total{reason="",result="error"} 0.0' in text
    lines = [line for line in text.splitlines() if line.startswith("wattmeter_aggregator_otlp_spans_total")]
    assert len(lines) == 2 + len(IGNORED_REASONS) + len(REJECTED_REASONS)


def test_the_aggregator_serves_otlp_on_its_grpc_port(aggregator: RunningAggregator) -> None:
    """`wattmeter aggregator` itself: the trace service beside Telemetry, its spans in the aggregator's store
    (before the answer) and counters, and its health."""
    response = export(
        aggregator.target, export_request([otlp_span(), otlp_span({"http.method": "GET"}, name="http_request")])
    )
    assert response.partial_success.rejected_spans == 0
    taken = aggregator.aggregator.store.request_spans(["chatcmpl-1"])
    assert [(s.hostname, s.request_id) for s in taken] == [("gpu-01", "chatcmpl-1")]
    with grpc.insecure_channel(aggregator.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    status, body = http_get(aggregator.http_url + "/metrics")
    text = body.decode()
    assert status == 200
    assert 'wattmeter_aggregator_spans_total{result="accepted"} 1.0' in text
    assert 'wattmeter_aggregator_otlp_spans_total{reason="",result="accepted"} 1.0' in text
    assert 'wattmeter_aggregator_otlp_spans_total{reason="not_llm",result="ignored"} 1.0' in text
