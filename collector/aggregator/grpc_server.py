"""The aggregator's gRPC server (grpc.aio): ``wattmeter.v1.Telemetry`` and the standard ``grpc.health.v1``.

Transport and identity: TLS with the server cert; with ``client_ca`` set, mTLS, and a client cert's CN and SAN DNS
names are the hosts it may send for; with ``agent_tokens`` set, every call carries ``authorization: Bearer <token>``
and the token's host is the host it may send for. A batch for any other host ends the stream PERMISSION_DENIED.

``Stream`` takes raw bytes (an identity deserializer) and parses them itself, so bytes that are not a Batch end
that one stream with INVALID_ARGUMENT and a clear message instead of an internal error.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collector.aggregator import otlp
from collector.aggregator.checker import CheckFailed
from collector.aggregator.config import GrpcConfig, IngestConfig
from collector.aggregator.ingest import (
    GarbageBatch,
    HostNotAllowed,
    Ingest,
    NewerProtocol,
    Outcome,
    StreamRefused,
)
from collector.aggregator.metrics import AggregatorMetrics
from collector.aggregator.request_columns import span_columns
from collector.aggregator.spans import MAX_TEXT
from collector.config import parse_listen
from collector.errors import ConfigError
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import SpanColumns

log = logging.getLogger(__name__)

SERVICE = "wattmeter.v1.Telemetry"
MAX_SPAN_ERRORS = 5  # lines of errors in a SpanReportResult
MAX_DETAILS = 2000  # characters of a status message (see status_details)
MAX_LISTED = 5  # names in a status message
SPANS_INLINE_BYTES = 64 * 1024  # a ReportSpans call larger than this is parsed and checked off the event loop
STATUS_OF: dict[type[StreamRefused], grpc.StatusCode] = {
    GarbageBatch: grpc.StatusCode.INVALID_ARGUMENT,
    NewerProtocol: grpc.StatusCode.FAILED_PRECONDITION,
    HostNotAllowed: grpc.StatusCode.PERMISSION_DENIED,
}


class Unauthenticated(Exception):
    pass


def status_details(text: str) -> str:
    """``text`` short enough for a status message: it travels in the trailers, which gRPC clients cap (16 KiB by
    default, 8 KiB soft); a longer one reaches the client as RESOURCE_EXHAUSTED instead of its status."""
    if len(text) <= MAX_DETAILS:
        return text
    return f"{text[: MAX_DETAILS - 40]}... ({len(text)} characters in all)"


def names_text(names: Collection[str]) -> str:
    """At most a few of ``names`` (sorted, each shortened), and how many more."""
    listed = sorted(names)
    shown = ", ".join(name if len(name) <= 64 else name[:61] + "..." for name in listed[:MAX_LISTED])
    return shown if len(listed) <= MAX_LISTED else f"{shown} and {len(listed) - MAX_LISTED} more"


class CallRefused(Exception):
    """A ``ReportSpans`` call refused whole, with its status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = status_details(details)


def _checked_report(
    data: bytes, allowed: frozenset[str] | None, received_ns: int, latest_ns: int
) -> tuple[SpanColumns, list[str]]:
    """A ``ReportSpans`` call's bytes as the columns of its valid spans, and why the others are invalid; raises
    ``CallRefused`` when they are not a SpanReport, or name hosts the caller may not send for."""
    report = pb.SpanReport()
    try:
        report.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CallRefused(
            grpc.StatusCode.INVALID_ARGUMENT, f"{len(data)} bytes that are not a wattmeter.v1.SpanReport ({exc})"
        ) from None
    if allowed is not None:
        # a span with no hostname is malformed, not another host's: span_columns rejects it alone
        outside = {s.hostname[:MAX_TEXT] for s in report.spans if s.hostname and s.hostname not in allowed}
        if outside:
            raise CallRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"spans for {len(outside)} host(s) the credentials are not for: {names_text(outside)}; "
                f"the credentials are for {names_text(allowed)}",
            )
    return span_columns(report.spans, received_ns, latest_ns)


@dataclass(frozen=True)
class AuthPolicy:
    """Which hosts a call may speak for, from its client cert (mTLS) and bearer token; None: any host."""

    mtls: bool
    token_hashes: Mapping[str, str]  # hostname -> "sha256:<hex>"

    def allowed_hosts(self, auth_context: Mapping[str, Any], metadata: Any) -> frozenset[str] | None:
        hosts: frozenset[str] | None = None
        if self.mtls:
            names = {
                value.decode(errors="replace")
                for key in ("x509_common_name", "x509_subject_alternative_name")
                for value in auth_context.get(key, ())
            }
            if not names:
                raise Unauthenticated("no client certificate with a CN or SAN DNS name (mTLS is required)")
            hosts = frozenset(names)
        if self.token_hashes:
            token = ""
            for key, value in metadata or ():
                if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                    token = value[len("Bearer ") :].strip()
            if not token:
                raise Unauthenticated("no bearer token: send metadata 'authorization: Bearer <token>'")
            digest = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
            token_hosts = frozenset(
                host for host, known in self.token_hashes.items() if hmac.compare_digest(digest, known.lower())
            )
            if not token_hosts:
                raise Unauthenticated("wrong bearer token (not in [grpc.agent_tokens])")
            hosts = token_hosts if hosts is None else hosts & token_hosts
        return hosts


class TelemetryServicer:
    def __init__(
        self,
        ingest: Ingest,
        metrics: AggregatorMetrics,
        auth: AuthPolicy,
        limits: IngestConfig,
    ) -> None:
        self.ingest = ingest
        self.metrics = metrics
        self.auth = auth
        self.limits = limits

    async def _allowed(self, context: grpc.aio.ServicerContext[Any, Any]) -> frozenset[str] | None:
        try:
            return self.auth.allowed_hosts(context.auth_context(), context.invocation_metadata())
        except Unauthenticated as exc:
            log.warning("refused a call from %s: %s", context.peer(), exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # abort raised already; for the type checker

    async def stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, pb.Ack]
    ) -> AsyncIterator[pb.Ack]:
        allowed = await self._allowed(context)
        seen: set[str] = set()  # instances met on this stream: their first batch re-reads their state
        self.metrics.stream_opened()
        try:
            async for data in requests:
                try:
                    outcome: Outcome = await self.ingest.handle(data, allowed, seen)
                except StreamRefused as exc:
                    log.warning("ended a stream from %s: %s", context.peer(), exc)
                    await context.abort(STATUS_OF[type(exc)], status_details(str(exc)))
                except CheckFailed as exc:
                    # nothing was acknowledged, the agent keeps the batch and sends it again
                    log.error("checking a batch from %s failed: %s", context.peer(), exc)
                    self.metrics.count_batch("error")
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, status_details(f"the aggregator could not check the batch: {exc}")
                    )
                except Exception as exc:
                    # storage failed: nothing was acknowledged, the agent keeps the batch and sends it again
                    log.exception("storing a batch from %s failed", context.peer())
                    self.metrics.count_batch("error")
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, status_details(f"the aggregator could not store the batch: {exc}")
                    )
                yield outcome.ack
        finally:
            self.metrics.stream_closed()

    async def report_spans(self, data: bytes, context: grpc.aio.ServicerContext[bytes, pb.SpanReportResult]) -> bytes:
        allowed = await self._allowed(context)
        received_ns = self.ingest.clock_ns()
        latest_ns = received_ns + int(self.limits.max_future_s * 1e9)
        try:
            if len(data) <= SPANS_INLINE_BYTES:
                accepted, errors = _checked_report(data, allowed, received_ns, latest_ns)
            else:
                # a large call (up to max_message_bytes: millions of spans, each rejected with its message) takes
                # seconds to parse and check: off the event loop, which serves every other call and stream meanwhile
                accepted, errors = await asyncio.get_running_loop().run_in_executor(
                    None, _checked_report, data, allowed, received_ns, latest_ns
                )
        except CallRefused as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                log.warning("refused a ReportSpans call from %s: %s", context.peer(), exc.details)
            await context.abort(exc.code, exc.details)
        if len(accepted):
            try:
                await self.store_spans(accepted)
            except Exception as exc:
                # nothing is known stored: the sender sends them again, and a span stored twice is stored once
                log.exception("storing %d spans from %s failed", len(accepted), context.peer())
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, status_details(f"the aggregator could not store the spans: {exc}")
                )
        self.metrics.count_spans(len(accepted), len(errors))
        result = pb.SpanReportResult(accepted=len(accepted), rejected=len(errors), errors=errors[:MAX_SPAN_ERRORS])
        return result.SerializeToString()

    async def store_spans(self, spans: SpanColumns) -> None:
        """Store ``spans`` (one transaction, in a store thread: never on the event loop); returns once committed.
        The store hands the new ones to the request engine then (``Store.add_span_listener``)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.ingest.executor, self.ingest.store.write_span_columns, spans)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                # no request deserializer: the handlers get the raw bytes (see the module docstring)
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.stream, response_serializer=pb.Ack.SerializeToString
                ),
                "ReportSpans": grpc.unary_unary_rpc_method_handler(self.report_spans),
            },
        )


def _read(what: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"[grpc] {what} {path}: {exc.strerror or exc} (check the path and its permissions)") from None


def server_credentials(config: GrpcConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    pair = (_read("tls_key", config.tls_key), _read("tls_cert", config.tls_cert))
    if config.client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read("client_ca", config.client_ca), require_client_auth=True
    )


def grpc_address(listen: str) -> str:
    host, port = parse_listen(listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """The Telemetry and health services on ``[grpc] listen``."""

    def __init__(
        self,
        config: GrpcConfig,
        ingest: Ingest,
        metrics: AggregatorMetrics,
        limits: IngestConfig,
    ) -> None:
        self.config = config
        self.credentials = server_credentials(config)
        self.servicer = TelemetryServicer(
            ingest, metrics, AuthPolicy(config.client_ca is not None, dict(config.agent_tokens)), limits
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        # OTLP/gRPC traces on the same port: vLLM's --otlp-traces-endpoint needs no code change
        self.otlp = otlp.TraceServicer(
            self._take_otlp_spans,
            allowed_hosts=self.servicer.auth.allowed_hosts,
            clock_ns=ingest.clock_ns,
            limits=otlp.Limits(max_future_s=limits.max_future_s),
        )
        metrics.providers.append(self.otlp.counters.families)

    async def _take_otlp_spans(self, spans: list[pb.RequestSpan]) -> None:
        """Store an Export's spans before it is answered; raising makes the call UNAVAILABLE, which OTLP exporters
        retry (a span stored twice is stored once)."""
        columns, _ = span_columns(spans, self.servicer.ingest.clock_ns(), None)  # checked by otlp's mapping
        await self.servicer.store_spans(columns)
        self.servicer.metrics.count_spans(len(spans), 0)

    async def start(self) -> int:
        """Bind and serve; returns the port. Raises OSError when the address cannot be bound."""
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            # agents ping every [stream] keepalive_s (30 s by default) on idle streams; the default floor of 5
            # minutes would answer their pings with GOAWAY ("too_many_pings")
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers([self.servicer.handler()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        otlp.add_trace_service(server, self.otlp)
        address = grpc_address(self.config.listen)
        try:
            if self.credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, self.credentials)
        except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind ...")
            raise OSError(f"cannot listen on {self.config.listen}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await server.start()
        for service in ("", SERVICE, otlp.SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        self.port = port
        return port

    async def stop(self, grace_s: float) -> None:
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.server = None
