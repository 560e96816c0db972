"""Request spans, way 3: an OTLP/gRPC trace receiver (``opentelemetry.proto.collector.trace.v1.TraceService/Export``).

vLLM started with ``--otlp-traces-endpoint http://AGGREGATOR:9751`` (``https://`` when the port has TLS: the OTLP
gRPC exporter takes the scheme for its transport) sends one ``llm_request`` span per finished request.
``TraceServicer`` maps those to ``wattmeter.v1.RequestSpan`` messages and hands each Export's accepted spans to a
callback; other spans are ignored.

Mapping (span attributes first, then resource attributes, for every key):

==========================================  ==========================================================================
RequestSpan field                           OTLP source
==========================================  ==========================================================================
request_id                                  ``gen_ai.request.id``; else ``<trace id hex>-<span id hex>``
start_ns, end_ns                            ``start_time_unix_nano``, ``end_time_unix_nano``
hostname                                    ``host.name``; else the one host the caller's credentials name
pid                                         ``process.pid``
service_name                                ``service.name``
workload                                    ``wattmeter.workload``
tenant                                      ``wattmeter.tenant``
model                                       ``gen_ai.response.model``; else ``gen_ai.request.model``
input_tokens                                ``gen_ai.usage.input_tokens``; else ``gen_ai.usage.prompt_tokens``
output_tokens                               ``gen_ai.usage.output_tokens``; else ``gen_ai.usage.completion_tokens``
prefill_end_ns (first token)                start + ``gen_ai.latency.time_to_first_token``; without it,
                                            end - ``gen_ai.latency.time_in_model_decode``; without both,
                                            (queue end or start) + ``gen_ai.latency.time_in_model_prefill``
queue_end_ns (scheduled)                    first token - ``time_in_model_prefill`` when both are known; else
                                            start + ``gen_ai.latency.time_in_queue``
==========================================  ==========================================================================

Why the first token anchors the boundaries: vLLM's span starts at the request's arrival and its
``time_to_first_token`` counts from arrival too, while ``time_in_queue`` counts from the engine core's queued
timestamp (after tokenisation and the hop to the engine) and ``time_in_model_prefill`` from scheduled to first token
(vllm/v1/engine/output_processor.py, ``do_tracing``). start + queue + prefill would put the first token early by the
preprocessing time; start + TTFT - prefill puts "scheduled" where the GPU work began, and the preprocessing before it
counts as queue time (no GPU energy). Latencies are seconds; times are Unix ns.

Tenant comes from ``wattmeter.tenant`` only: no OpenTelemetry convention names a tenant (``gen_ai.request.tenant``
is in no semantic convention), and a namespaced key cannot collide with another instrumentation's meaning. vLLM's
span attributes cannot be chosen by its user, but resource attributes can:
``OTEL_RESOURCE_ATTRIBUTES=host.name=$(hostname),wattmeter.workload=llama-70b,wattmeter.tenant=acme``
(or ``OTEL_EXPERIMENTAL_RESOURCE_DETECTORS=host,process`` for ``host.name`` and ``process.pid``).

Which spans: kind CLIENT spans never (a client span times the caller's wait, not work on its host); otherwise a
span named ``llm_request`` or carrying ``gen_ai.request.id`` or any ``gen_ai.usage.*`` attribute. The rest are
ignored and counted. A span with an unusable value (a wrong type, a negative or non-finite latency, more than
``MAX_TOKENS`` tokens, text with a NUL, end before start, a time before 2000 or in the future, latencies that
disagree or fall outside the span) is rejected whole, counted by
reason, and reported back in the response's ``partial_success`` (OTLP semantics: the call still succeeds). Nothing
in a span raises out of the mapping.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from collector.aggregator.spans import MAX_TEXT, MAX_TOKENS
from collector.exporters.exposition import Family
from collector.proto import wattmeter_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT_METHOD = f"/{SERVICE}/Export"

LLM_SPAN_NAME = "llm_request"  # vLLM's span per request
MIN_TIME_NS = 946_684_800 * 10**9  # 2000-01-01: an earlier span time is a clock or unit error, not a request
LATENCY_SLACK_NS = 1_000_000  # 1 ms: vLLM's latencies mix the engine's monotonic clock with the frontend's wall clock
MAX_ERROR_LINES = 5  # rejected spans described in partial_success.error_message
MAX_EXACT_DOUBLE = 2**53  # a token count sent as a double is exact up to here

# ignored (not an LLM request: dropped by design, not an error for the sender)
IGNORED_REASONS = ("not_llm", "client_span")
# rejected (an LLM request span whose values are unusable: counted in partial_success.rejected_spans)
REJECTED_REASONS = (
    "no_request_id",
    "no_hostname",
    "host_not_allowed",
    "text_too_long",
    "bad_attribute",
    "absurd_time",
    "end_before_start",
    "in_future",
    "duration_too_long",
    "latency_outside_span",
    "latency_inconsistent",
)

# attribute keys
REQUEST_ID = "gen_ai.request.id"
RESPONSE_MODEL = "gen_ai.response.model"
REQUEST_MODEL = "gen_ai.request.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
TIME_IN_PREFILL = "gen_ai.latency.time_in_model_prefill"
TIME_IN_DECODE = "gen_ai.latency.time_in_model_decode"
HOST_NAME = "host.name"
PROCESS_PID = "process.pid"
SERVICE_NAME = "service.name"
WORKLOAD = "wattmeter.workload"
TENANT = "wattmeter.tenant"

SpanCallback = Callable[[list[pb.RequestSpan]], Awaitable[None] | None]
# The aggregator's AuthPolicy.allowed_hosts: (auth context, invocation metadata) -> the hosts the caller may speak
# for, None for any; raises to refuse the call (the exception's text says why).
AllowedHosts = Callable[[Mapping[str, Any], Any], frozenset[str] | None]


class SpanRejected(Exception):
    """An LLM request span with an unusable value; ``reason`` is one of ``REJECTED_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_future_s: float = 300.0  # a span ending later than now + this is refused (clock skew)
    max_duration_s: float = 86_400.0  # a "request" longer than a day is a unit or clock error


DEFAULT_LIMITS = Limits()


@dataclass
class ExportResult:
    """What one Export request mapped to."""

    spans: list[pb.RequestSpan] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)
    rejected: list[SpanRejected] = field(default_factory=list)

    def partial_success_message(self) -> str:
        if not self.rejected:
            return ""
        by_reason = Counter(r.reason for r in self.rejected)
        head = ", ".join(f"{count} {reason}" for reason, count in sorted(by_reason.items()))
        lines = [r.detail for r in self.rejected[:MAX_ERROR_LINES]]
        more = len(self.rejected) - len(lines)
        tail = f"; and {more} more" if more else ""
        return f"{len(self.rejected)} span(s) rejected ({head}): {'; '.join(lines)}{tail}"


def _kind(value: common_pb2.AnyValue) -> str:
    return value.WhichOneof("value") or "empty"


def _shown(value: common_pb2.AnyValue) -> str:
    """A primitive value as Python writes it, or the kind of a composite one, for an error message."""
    kind = _kind(value)
    if kind in ("string_value", "bool_value", "int_value", "double_value", "bytes_value"):
        return repr(getattr(value, kind))[:64]
    return f"a {kind}"


class _Attributes:
    """A span's attributes over its resource's: every lookup tries the span first."""

    def __init__(self, span: Iterable[common_pb2.KeyValue], resource: Mapping[str, common_pb2.AnyValue]) -> None:
        self.span = {kv.key: kv.value for kv in span}
        self.resource = resource

    def get(self, key: str) -> common_pb2.AnyValue | None:
        value = self.span.get(key)
        return value if value is not None else self.resource.get(key)

    def text(self, key: str) -> str:
        """A string attribute; "" when absent or empty."""
        value = self.get(key)
        if value is None:
            return ""
        if _kind(value) != "string_value":
            raise SpanRejected("bad_attribute", f"{key} is {_shown(value)}, not a string")
        if len(value.string_value) > MAX_TEXT:
            raise SpanRejected("text_too_long", f"{key} is longer than {MAX_TEXT} characters")
        if "\0" in value.string_value:  # refused by spans.span_error, which OTLP's spans do not go through again
            raise SpanRejected("bad_attribute", f"{key} contains a NUL character")
        return value.string_value

    def count(self, key: str) -> int | None:
        """A token count (an integer 0..MAX_TOKENS; an integral double is taken too); None when absent."""
        value = self.get(key)
        if value is None:
            return None
        kind = _kind(value)
        count: int | None = None
        if kind == "int_value" and value.int_value >= 0:
            count = value.int_value
        elif kind == "double_value":
            number = value.double_value
            if math.isfinite(number) and 0 <= number <= MAX_EXACT_DOUBLE and number == int(number):
                count = int(number)
        if count is None:
            raise SpanRejected("bad_attribute", f"{key} is {_shown(value)}, not a count")
        if count > MAX_TOKENS:  # refused by spans.span_error too: a unit or counter error, and sums would overflow
            raise SpanRejected("bad_attribute", f"{key} is {count}, more than {MAX_TOKENS} tokens")
        return count

    def seconds(self, key: str, max_s: float) -> int | None:
        """A latency in seconds (int or double, finite, 0..max_s) as ns; None when absent."""
        value = self.get(key)
        if value is None:
            return None
        kind = _kind(value)
        if kind == "int_value":
            number = float(value.int_value)
        elif kind == "double_value":
            number = value.double_value
        else:
            raise SpanRejected("bad_attribute", f"{key} is {_shown(value)}, not seconds")
        if not (math.isfinite(number) and 0 <= number <= max_s):
            raise SpanRejected("bad_attribute", f"{key} is {number!r} s, not a latency (0..{max_s:g} s)")
        return round(number * 1e9)

    def pid(self, key: str) -> int:
        """A process id (1..2^32-1); 0 when absent."""
        value = self.get(key)
        if value is None:
            return 0
        if _kind(value) != "int_value" or not 0 < value.int_value < 2**32:
            raise SpanRejected("bad_attribute", f"{key} is {_shown(value)}, not a process id")
        return value.int_value


def ignored_reason(span: trace_pb2.Span) -> str | None:
    """Why ``span`` is not taken as an LLM request (one of ``IGNORED_REASONS``); None when it is taken."""
    if span.kind == trace_pb2.Span.SPAN_KIND_CLIENT:
        return "client_span"
    if span.name == LLM_SPAN_NAME:
        return None
    for kv in span.attributes:
        if kv.key == REQUEST_ID or kv.key.startswith("gen_ai.usage."):
            return None
    return "not_llm"


def _request_id(span: trace_pb2.Span, attributes: _Attributes) -> str:
    request_id = attributes.text(REQUEST_ID)
    if request_id:
        return request_id
    if len(span.trace_id) == 16 and len(span.span_id) == 8 and any(span.trace_id) and any(span.span_id):
        return f"{span.trace_id.hex()}-{span.span_id.hex()}"
    raise SpanRejected("no_request_id", f"span {span.name[:64]!r}: no {REQUEST_ID} and no valid trace and span ids")


def _boundaries(attributes: _Attributes, start: int, end: int, max_s: float) -> tuple[int, int]:
    """(queue_end_ns, prefill_end_ns) from the latencies, 0 where unknown (see the module docstring)."""
    queue = attributes.seconds(TIME_IN_QUEUE, max_s)
    ttft = attributes.seconds(TIME_TO_FIRST_TOKEN, max_s)
    prefill = attributes.seconds(TIME_IN_PREFILL, max_s)
    first = TIME_TO_FIRST_TOKEN
    if ttft is None:  # the first token is where decoding began (decode: first token to last)
        decode = attributes.seconds(TIME_IN_DECODE, max_s)
        if decode is not None:
            if decode > end - start + LATENCY_SLACK_NS:
                raise SpanRejected("latency_inconsistent", f"{TIME_IN_DECODE} is longer than the span")
            ttft, first = max(0, end - decode - start), f"the span's time to its end - {TIME_IN_DECODE}"
    queue_end = prefill_end = 0
    if ttft is not None:
        prefill_end = start + ttft
        if prefill is not None:
            if prefill > ttft + LATENCY_SLACK_NS:
                raise SpanRejected("latency_inconsistent", f"{TIME_IN_PREFILL} is longer than {first}")
            if queue is not None and queue + prefill > ttft + LATENCY_SLACK_NS:
                raise SpanRejected(
                    "latency_inconsistent", f"{TIME_IN_QUEUE} + {TIME_IN_PREFILL} is longer than {first}"
                )
            queue_end = max(start, prefill_end - prefill)
        elif queue is not None:
            if queue > ttft + LATENCY_SLACK_NS:
                raise SpanRejected("latency_inconsistent", f"{TIME_IN_QUEUE} is longer than {first}")
            queue_end = min(start + queue, prefill_end)
    else:
        if queue is not None:
            queue_end = start + queue
        if prefill is not None:
            prefill_end = (queue_end or start) + prefill
    for name, value in (("first token", prefill_end), ("queue end", queue_end)):
        if value > end + LATENCY_SLACK_NS:
            late_s = (value - end) / 1e9
            raise SpanRejected("latency_outside_span", f"the {name} from the latencies is {late_s:.6f} s past the end")
    return min(queue_end, end), min(prefill_end, end)


def map_span(
    span: trace_pb2.Span,
    resource: Mapping[str, common_pb2.AnyValue],
    now_ns: int,
    allowed: frozenset[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> pb.RequestSpan:
    """The RequestSpan of an LLM request ``span`` (see ``ignored_reason``); raises ``SpanRejected``, nothing else."""
    attributes = _Attributes(span.attributes, resource)
    request_id = _request_id(span, attributes)
    where = f"request {request_id[:64]!r}"
    try:
        start, end = span.start_time_unix_nano, span.end_time_unix_nano
        if start < MIN_TIME_NS:
            raise SpanRejected("absurd_time", f"start_time_unix_nano {start} is before 2000")
        if end < start:
            raise SpanRejected("end_before_start", f"end_time_unix_nano {end} is before start_time_unix_nano {start}")
        if end > now_ns + round(limits.max_future_s * 1e9):
            raise SpanRejected("in_future", f"end_time_unix_nano {end} is in the future (clock skew?)")
        if end - start > round(limits.max_duration_s * 1e9):
            raise SpanRejected("duration_too_long", f"{(end - start) / 1e9:.0f} s is longer than a request may last")
        hostname = attributes.text(HOST_NAME)
        if not hostname:
            if allowed is None or len(allowed) != 1:
                raise SpanRejected("no_hostname", f"no {HOST_NAME} (set OTEL_RESOURCE_ATTRIBUTES=host.name=...)")
            (hostname,) = allowed
        elif allowed is not None and hostname not in allowed:
            raise SpanRejected("host_not_allowed", f"{HOST_NAME} {hostname!r}: the credentials are for other hosts")
        input_tokens = attributes.count(INPUT_TOKENS)
        if input_tokens is None:
            input_tokens = attributes.count(PROMPT_TOKENS)
        output_tokens = attributes.count(OUTPUT_TOKENS)
        if output_tokens is None:
            output_tokens = attributes.count(COMPLETION_TOKENS)
        queue_end, prefill_end = _boundaries(attributes, start, end, limits.max_duration_s)
        return pb.RequestSpan(
            request_id=request_id,
            start_ns=start,
            end_ns=end,
            hostname=hostname,
            workload=attributes.text(WORKLOAD),
            pid=attributes.pid(PROCESS_PID),
            service_name=attributes.text(SERVICE_NAME),
            model=attributes.text(RESPONSE_MODEL) or attributes.text(REQUEST_MODEL),
            tenant=attributes.text(TENANT),
            input_tokens=input_tokens or 0,
            output_tokens=output_tokens or 0,
            prefill_end_ns=prefill_end,
            queue_end_ns=queue_end,
            span_id=span.span_id.hex() if len(span.span_id) == 8 and any(span.span_id) else "",
        )
    except SpanRejected as exc:
        raise SpanRejected(exc.reason, f"{where}: {exc.detail}") from None


def map_export(
    request: otlp.ExportTraceServiceRequest,
    now_ns: int,
    allowed: frozenset[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ExportResult:
    result = ExportResult()
    for resource_spans in request.resource_spans:
        resource = {kv.key: kv.value for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                reason = ignored_reason(span)
                if reason is not None:
                    result.ignored[reason] += 1
                    continue
                try:
                    result.spans.append(map_span(span, resource, now_ns, allowed, limits))
                except SpanRejected as exc:
                    result.rejected.append(exc)
    return result


@dataclass(frozen=True)
class OtlpCounts:
    accepted: int
    ignored: dict[str, int]
    rejected: dict[str, int]
    errors: int  # valid spans the callback failed to take (the sender was told UNAVAILABLE and retries)
    exports: int  # Export calls answered


class OtlpCounters:
    """Spans received over OTLP, by result and reason; thread-safe, read at each scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted = 0
        self._ignored: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._errors = 0
        self._exports = 0

    def add(self, result: ExportResult) -> None:
        with self._lock:
            self._exports += 1
            self._accepted += len(result.spans)
            self._ignored.update(result.ignored)
            self._rejected.update(r.reason for r in result.rejected)

    def add_error(self, spans: int) -> None:
        with self._lock:
            self._errors += spans

    def snapshot(self) -> OtlpCounts:
        with self._lock:
            return OtlpCounts(
                self._accepted,
                {reason: self._ignored[reason] for reason in IGNORED_REASONS},
                {reason: self._rejected[reason] for reason in REJECTED_REASONS},
                self._errors,
                self._exports,
            )

    def families(self) -> list[Family]:
        counts = self.snapshot()
        spans = Family(
            "wattmeter_aggregator_otlp_spans",
            "counter",
            "Spans received over OTLP/gRPC, by result (accepted, ignored: not an LLM request, rejected: unusable "
            "values, error: the aggregator could not take them and the sender retries) and reason.",
            ("result", "reason"),
        )
        spans.add(("accepted", ""), float(counts.accepted))
        for reason, count in counts.ignored.items():
            spans.add(("ignored", reason), float(count))
        for reason, count in counts.rejected.items():
            spans.add(("rejected", reason), float(count))
        spans.add(("error", ""), float(counts.errors))
        return [spans]


class TraceServicer:
    """``TraceService/Export``: OTLP spans in, ``RequestSpan`` lists out to ``on_spans`` (sync or async).

    ``on_spans`` gets each Export's accepted spans (never an empty list), every one with its hostname set. When it
    raises, the call fails UNAVAILABLE, which OTLP exporters retry, so it must take a retried span again safely.
    ``allowed_hosts`` (the aggregator's ``AuthPolicy.allowed_hosts``) refuses unauthenticated calls and limits the
    hosts a caller may send spans for; without it any caller may send for any host.
    """

    def __init__(
        self,
        on_spans: SpanCallback,
        allowed_hosts: AllowedHosts | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        limits: Limits = DEFAULT_LIMITS,
        counters: OtlpCounters | None = None,
    ) -> None:
        self.on_spans = on_spans
        self.allowed_hosts = allowed_hosts
        self.clock_ns = clock_ns
        self.limits = limits
        self.counters = counters if counters is not None else OtlpCounters()

    async def export(self, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        allowed: frozenset[str] | None = None
        if self.allowed_hosts is not None:
            try:
                allowed = self.allowed_hosts(context.auth_context(), context.invocation_metadata())
            except Exception as exc:  # the policy's refusal, whatever its type: its text says why
                log.warning("refused an OTLP export from %s: %s", context.peer(), exc)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        request = otlp.ExportTraceServiceRequest()
        try:
            request.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{len(data)} bytes that are not an ExportTraceServiceRequest ({exc})"
            )
        result = map_export(request, self.clock_ns(), allowed, self.limits)
        if result.spans:
            try:
                returned = self.on_spans(result.spans)
                if inspect.isawaitable(returned):
                    await returned
            except Exception as exc:
                log.exception("taking %d OTLP spans from %s failed", len(result.spans), context.peer())
                self.counters.add_error(len(result.spans))
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the aggregator could not take the spans: {exc}")
        self.counters.add(result)
        response = otlp.ExportTraceServiceResponse()
        if result.rejected:
            response.partial_success.rejected_spans = len(result.rejected)
            response.partial_success.error_message = result.partial_success_message()
        return response.SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        # no deserializers: the handler parses the bytes itself, so garbage is INVALID_ARGUMENT with a message
        # rather than an internal error (as the Telemetry service does)
        return grpc.method_handlers_generic_handler(
            SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(self.export)}
        )


def add_trace_service(server: grpc.aio.Server, servicer: TraceServicer) -> None:
    """Serve ``servicer`` on ``server`` (before ``server.start()``)."""
    server.add_generic_rpc_handlers([servicer.handler()])
