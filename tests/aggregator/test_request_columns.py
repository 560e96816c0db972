"""``request_columns.span_columns``: a call's spans as the store's columns, checked as a whole; it must accept and
refuse exactly what ``spans.span_error`` does, span by span, with its messages."""

from __future__ import annotations

from typing import Any

import pytest

from collector.aggregator.request_columns import span_columns
from collector.aggregator.spans import MAX_LABELS, MAX_TEXT, MAX_TOKENS, span_error, span_row
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import SpanColumns

S = 1_000_000_000
NOW = 1_800_000_000 * S
LATEST = NOW + 300 * S


def span(**fields: Any) -> pb.RequestSpan:
    base: dict[str, Any] = dict(
        request_id="r", span_id="s", hostname="gpu-1", start_ns=NOW - 2 * S, end_ns=NOW - S, workload="vllm",
        model="llama", output_tokens=10,
    )  # fmt: skip
    base.update(fields)
    return pb.RequestSpan(**base)


INVALID = [
    span(request_id=""),
    span(hostname=""),
    span(hostname="h" * (MAX_TEXT + 1)),
    *(span(**{name: "x" * (MAX_TEXT + 1)}) for name in ("request_id", "span_id", "workload", "service_name", "model")),
    *(span(**{name: "a\0b"}) for name in ("request_id", "span_id", "workload", "service_name", "model", "tenant")),
    span(start_ns=0),
    span(end_ns=NOW - 3 * S),
    span(end_ns=LATEST + 1),
    span(input_tokens=MAX_TOKENS + 1),
    span(output_tokens=MAX_TOKENS + 1),
    span(labels={f"k{i}": "v" for i in range(MAX_LABELS + 1)}),
    span(labels={"k": "v" * (MAX_TEXT + 1)}),
    span(queue_end_ns=NOW - 3 * S),
    span(prefill_end_ns=NOW),
]
VALID = [
    span(),
    span(request_id="b", span_id="", pid=42, service_name="svc", tenant="acme", input_tokens=MAX_TOKENS),
    span(request_id="c", labels={"k": "v", "a": "b"}, queue_end_ns=NOW - 2 * S, prefill_end_ns=NOW - S),
    span(request_id="d", hostname="host\0x", end_ns=LATEST),  # a NUL in a host name is stored as U+FFFD
    span(request_id="e" * MAX_TEXT),
]


@pytest.mark.parametrize("bad", INVALID, ids=lambda s: (span_error(s, s.hostname, LATEST) or "valid")[:60])
def test_each_invalid_span_is_refused_with_span_errors_message(bad: pb.RequestSpan) -> None:
    expected = span_error(bad, bad.hostname, LATEST)
    assert expected is not None
    columns, errors = span_columns([span(request_id="before"), bad, span(request_id="after")], NOW, LATEST)
    assert errors == [expected]
    assert columns.request_id == ["before", "after"]


def test_valid_spans_are_the_rows_span_row_makes_in_order() -> None:
    spans = [*VALID[:2], *INVALID[:3], *VALID[2:], INVALID[-1]]
    columns, errors = span_columns(spans, NOW, LATEST)
    assert errors == [e for e in (span_error(s, s.hostname, LATEST) for s in spans) if e is not None]
    assert columns == SpanColumns.of([span_row(s, s.hostname, NOW) for s in VALID])


def test_spans_checked_already_are_taken_as_they_are() -> None:
    columns, errors = span_columns(VALID, NOW, None)
    assert errors == []
    assert columns.spans() == [span_row(s, s.hostname, NOW) for s in VALID]
    assert span_columns([], NOW, LATEST) == (SpanColumns.empty(), [])
