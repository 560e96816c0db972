"""A call's request spans (``ReportSpans``, OTLP) as the store's columns, checked, with no object per span.

``span_columns`` reads every span's scalar fields in one C call (``attrgetter``) and checks the columns as a
whole: numpy for times and tokens, one scan per text column for lengths and NUL. Only a span that may be invalid
(or has labels) goes through ``spans.span_error``, which gives its message: the checks here are a superset of
``span_error``'s, never a replacement (measured on 20,000 spans: 3.5 us a span for the columns against 6 us for
``span_error`` plus 9.5 us for ``span_row`` per span).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import numpy as np

from collector.aggregator.spans import MAX_TEXT, MAX_TOKENS, derived_span_id, span_error
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import SpanColumns, labels_json

_FIELDS = attrgetter(
    "request_id", "span_id", "hostname", "start_ns", "end_ns", "workload", "pid", "service_name", "model", "tenant",
    "input_tokens", "output_tokens", "queue_end_ns", "prefill_end_ns",
)  # fmt: skip


def _suspect_text(column: list[str]) -> list[int] | None:
    """Rows of a text column too long or holding a NUL; None when none (one pass in C for the usual case)."""
    if max(map(len, column)) <= MAX_TEXT and "\0" not in "".join(column):
        return None
    return [i for i, value in enumerate(column) if len(value) > MAX_TEXT or "\0" in value]


def span_columns(
    spans: Sequence[pb.RequestSpan], received_ns: int, latest_ns: int | None
) -> tuple[SpanColumns, list[str]]:
    """The valid ones of ``spans`` (each on its own ``hostname``) as columns, and why the others are invalid
    (``span_error``'s messages, in order). ``latest_ns`` None: the spans were checked already (OTLP's mapping)."""
    n = len(spans)
    if not n:
        return SpanColumns.empty(), []
    # one C call per span reads its 14 scalar fields (measured: 2.5 against 5.5 us a span for a list
    # comprehension per field)
    (
        request_id, span_id, hostname, start, end, workload, pid, service_name, model, tenant, input_tokens,
        output_tokens, queue_end, prefill_end,
    ) = map(list, zip(*map(_FIELDS, spans), strict=True))  # fmt: skip
    label_counts = [len(s.labels) for s in spans]
    suspect: set[int] = set()
    if latest_ns is not None:
        for column in (request_id, span_id, hostname, workload, service_name, model, tenant):
            rows = _suspect_text(column)
            if rows:
                suspect.update(rows)
        if not all(request_id) or not all(hostname):
            suspect.update(i for i in range(n) if not request_id[i] or not hostname[i])
        t0, t1 = np.array(start, np.uint64), np.array(end, np.uint64)
        q, p = np.array(queue_end, np.uint64), np.array(prefill_end, np.uint64)
        bad = (t0 == 0) | (t1 < t0) | (t1 > np.uint64(max(latest_ns, 0)))
        bad |= (np.array(input_tokens, np.uint64) > MAX_TOKENS) | (np.array(output_tokens, np.uint64) > MAX_TOKENS)
        bad |= (q != 0) & ((q < t0) | (q > t1))
        bad |= (p != 0) & ((p < t0) | (p > t1))
        bad |= np.array(label_counts) > 0  # labels: checked span by span
        suspect.update(np.flatnonzero(bad).tolist())
    errors: list[str] = []
    rejected: list[int] = []
    for i in sorted(suspect):
        error = span_error(spans[i], hostname[i], latest_ns if latest_ns is not None else 0)
        if error is not None:
            errors.append(error)
            rejected.append(i)
    labels = ["{}"] * n
    if any(label_counts):
        labels = [labels_json(dict(s.labels)) if count else "{}" for s, count in zip(spans, label_counts, strict=True)]
    if not all(span_id):
        span_id = [sid or derived_span_id(s, host) for sid, s, host in zip(span_id, spans, hostname, strict=True)]
    columns = SpanColumns(
        request_id, span_id, hostname, start, end, workload, pid, service_name, model, tenant, input_tokens,
        output_tokens, queue_end, prefill_end, labels, [received_ns] * n,
    )  # fmt: skip
    if rejected:
        dropped = set(rejected)
        columns = columns.take(i for i in range(n) if i not in dropped)
    return columns, errors
