"""The aggregator's check of a request span (``spans.span_error``) and the rows it becomes."""

from __future__ import annotations

import pytest

from collector.aggregator.spans import MAX_TEXT, derived_span_id, span_error, span_row
from collector.proto import wattmeter_pb2 as pb

NOW = 1_800_000_000 * 10**9


def valid(**changes: object) -> pb.RequestSpan:
    fields: dict[str, object] = {"request_id": "r-1", "start_ns": NOW - 2 * 10**9, "end_ns": NOW - 10**9}
    fields.update(changes)
    return pb.RequestSpan(**fields)  # type: ignore[arg-type]


def test_a_valid_span_passes() -> None:
    assert span_error(valid(model="m", tenant="t", span_id="abc"), "gpu-01", NOW) is None


@pytest.mark.parametrize("name", ["request_id", "span_id", "workload", "service_name", "model", "tenant"])
def test_nul_in_a_name_is_refused_with_its_field(name: str) -> None:
    """PostgreSQL refuses NUL in text: a span carrying one would fail its whole batch's transaction on every replay."""
    error = span_error(valid(**{name: "a\0b"}), "gpu-01", NOW)
    assert error is not None and name in error and "NUL" in error


@pytest.mark.parametrize("name", ["request_id", "span_id", "model"])
def test_text_longer_than_the_limit_is_refused(name: str) -> None:
    assert span_error(valid(**{name: "x" * MAX_TEXT}), "h", NOW) is None
    error = span_error(valid(**{name: "x" * (MAX_TEXT + 1)}), "h", NOW)
    assert error is not None and name in error


def test_a_span_without_id_gets_a_stable_derived_one() -> None:
    span = valid(workload="w", pid=7)
    row = span_row(span, "gpu-01", NOW)
    assert row.span_id == derived_span_id(span, "gpu-01") == span_row(valid(workload="w", pid=7), "gpu-01", 0).span_id
    assert row.span_id != span_row(valid(workload="w", pid=8), "gpu-01", NOW).span_id
    assert row.span_id != span_row(span, "gpu-02", NOW).span_id
    assert span_row(valid(span_id="given"), "gpu-01", NOW).span_id == "given"
