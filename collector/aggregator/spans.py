"""Request spans: checked and counted; kept for now in a bounded in-memory buffer.

Storing spans and joining them with raw samples (energy per request) is the next issue's work. Until then the
aggregator accepts valid spans, counts them (``wattmeter_aggregator_spans_total``) and keeps the latest
``capacity`` in memory only: they are lost on restart, and the oldest go when the buffer is full.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from dataclasses import dataclass

from collector.proto import wattmeter_pb2 as pb

MAX_TEXT = 256  # characters in an id or name; more is not a name but garbage


@dataclass(frozen=True)
class ReceivedSpan:
    hostname: str
    span: pb.RequestSpan


def span_error(span: pb.RequestSpan, hostname: str, latest_ns: int) -> str | None:
    """Why ``span`` (on ``hostname``, its own or the batch's) is invalid; None when it is valid."""
    if not span.request_id:
        return "request_id is empty"
    if not hostname:
        return f"request {span.request_id[:MAX_TEXT]!r}: hostname is empty (set it on every span of a SpanReport)"
    for name in ("request_id", "span_id", "workload", "service_name", "model", "tenant"):
        if len(getattr(span, name)) > MAX_TEXT:
            return f"request {span.request_id[:64]!r}: {name} is longer than {MAX_TEXT} characters"
    if len(hostname) > MAX_TEXT:
        return f"request {span.request_id!r}: hostname is longer than {MAX_TEXT} characters"
    if span.start_ns == 0 or span.end_ns < span.start_ns:
        return f"request {span.request_id!r}: start_ns {span.start_ns} and end_ns {span.end_ns} are not a time span"
    if span.end_ns > latest_ns:
        return f"request {span.request_id!r}: end_ns {span.end_ns} is in the future (clock skew?)"
    for name in ("prefill_end_ns", "queue_end_ns"):
        value = getattr(span, name)
        if value and not span.start_ns <= value <= span.end_ns:
            return f"request {span.request_id!r}: {name} {value} is outside start_ns..end_ns"
    return None


def derived_span_id(span: pb.RequestSpan, hostname: str) -> str:
    """The span id of a span that came without one: the same span sent twice gets the same id, two spans of one
    request on different hosts, workloads, processes or times get different ones. Prefixed so that it never equals
    a sender's id (those are hex or the client's 16 hex digits)."""
    key = f"{hostname}\0{span.workload}\0{span.pid}\0{span.service_name}\0{span.start_ns}\0{span.end_ns}"
    return "d-" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


class SpanBuffer:
    """The latest ``capacity`` accepted spans, in arrival order (see the module docstring)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._spans: deque[ReceivedSpan] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def extend(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)
