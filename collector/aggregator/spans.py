"""Request spans and process bindings as they come in: checked, and turned into the store's rows.

Spans arrive in agents' batches (stored in the batch's transaction), through ``ReportSpans`` and over OTLP (each
call's spans stored in one transaction before it is answered). A span the sender gave no ``span_id`` gets one
derived from what makes it one span (``derived_span_id``), so that a span sent twice is stored once.
"""

from __future__ import annotations

import hashlib

from collector.proto import wattmeter_pb2 as pb
from collector.store.base import ProcessBindingRow, SpanRow

MAX_TEXT = 256  # characters in an id or name; more is not a name but garbage
MAX_LABELS = 64  # labels on one span (the client library sends at most 16)
# tokens in one span: token weights stay exact integers (summed over a million concurrent spans, under 2**53)
MAX_TOKENS = 2**31


def span_error(span: pb.RequestSpan, hostname: str, latest_ns: int) -> str | None:
    """Why ``span`` (on ``hostname``, its own or the batch's) is invalid; None when it is valid."""
    if not span.request_id:
        return "request_id is empty"
    if not hostname:
        return f"request {span.request_id[:MAX_TEXT]!r}: hostname is empty (set it on every span of a SpanReport)"
    for name in ("request_id", "span_id", "workload", "service_name", "model", "tenant"):
        text = getattr(span, name)
        if len(text) > MAX_TEXT:
            return f"request {span.request_id[:64]!r}: {name} is longer than {MAX_TEXT} characters"
        if "\0" in text:
            return f"request {span.request_id[:64]!r}: {name} contains a NUL character"
    if len(hostname) > MAX_TEXT:
        return f"request {span.request_id!r}: hostname is longer than {MAX_TEXT} characters"
    if span.start_ns == 0 or span.end_ns < span.start_ns:
        return f"request {span.request_id!r}: start_ns {span.start_ns} and end_ns {span.end_ns} are not a time span"
    if span.end_ns > latest_ns:
        return f"request {span.request_id!r}: end_ns {span.end_ns} is in the future (clock skew?)"
    if span.input_tokens > MAX_TOKENS or span.output_tokens > MAX_TOKENS:
        return f"request {span.request_id!r}: more than {MAX_TOKENS} tokens (a unit or counter error)"
    if len(span.labels) > MAX_LABELS:
        return f"request {span.request_id!r}: {len(span.labels)} labels, more than {MAX_LABELS}"
    for key, value in span.labels.items():
        if len(key) > MAX_TEXT or len(value) > MAX_TEXT:
            return f"request {span.request_id!r}: label {key[:64]!r} or its value is longer than {MAX_TEXT} characters"
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


def span_row(span: pb.RequestSpan, hostname: str, received_ns: int) -> SpanRow:
    """``span`` (valid: see ``span_error``) as stored, on ``hostname`` (its own or its batch's)."""
    return SpanRow(
        request_id=span.request_id,
        span_id=span.span_id or derived_span_id(span, hostname),
        hostname=hostname,
        start_ns=span.start_ns,
        end_ns=span.end_ns,
        workload=span.workload,
        pid=span.pid,
        service_name=span.service_name,
        model=span.model,
        tenant=span.tenant,
        input_tokens=span.input_tokens,
        output_tokens=span.output_tokens,
        queue_end_ns=span.queue_end_ns,
        prefill_end_ns=span.prefill_end_ns,
        labels=dict(span.labels),
        received_ns=received_ns,
    )


def binding_error(binding: pb.ProcessBinding) -> str | None:
    """Why a pid -> workload binding is unusable; None when it is usable."""
    identity = binding.workload
    if binding.pid == 0:
        return "pid 0"
    if not identity.workload:
        return f"pid {binding.pid}: the workload name is empty"
    for name in ("workload", "phase", "job"):
        if len(getattr(identity, name)) > MAX_TEXT:
            return f"pid {binding.pid}: {name} is longer than {MAX_TEXT} characters"
    return None


def binding_row(binding: pb.ProcessBinding, hostname: str, seen_ns: int) -> ProcessBindingRow:
    identity = binding.workload
    return ProcessBindingRow(hostname, binding.pid, identity.workload, identity.phase, identity.job, seen_ns)
