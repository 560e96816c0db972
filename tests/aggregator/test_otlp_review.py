"""Review tests for the OTLP trace receiver: what it accepts, the aggregator's own span check
(``spans.span_error``) accepts too. ``span_columns(..., latest_ns=None)`` trusts OTLP's mapping and checks
nothing again, so a value the mapping lets through reaches the store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from collector.aggregator.spans import MAX_TOKENS, span_error
from tests.aggregator.conftest import RunningAggregator
from tests.aggregator.test_otlp import NOW, RESOURCE, Receiver, export, export_request, otlp_span, vllm


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """test_otlp's receiver: a trace service alone on loopback, its clock at NOW."""
    started = Receiver()
    yield started
    started.stop()


def _export_good_and(
    receiver: Receiver, span_attributes: dict[str, Any], resource: dict[str, Any] | None = None
) -> Any:
    """An Export of a good span (its own resource) and a span with ``span_attributes`` changed."""
    request = export_request([otlp_span(vllm(**{"gen_ai.request.id": "good"}))])
    request.resource_spans.extend(export_request([otlp_span(vllm(**span_attributes))], resource).resource_spans)
    return export(receiver.target, request)


@pytest.mark.parametrize(
    "key",
    ["gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens", "gen_ai.usage.input_tokens"],
)
@pytest.mark.parametrize("tokens", [MAX_TOKENS + 1, 2**62, float(2**40)])
def test_token_counts_over_max_tokens_are_rejected(receiver: Receiver, key: str, tokens: int | float) -> None:
    response = _export_good_and(receiver, {"gen_ai.request.id": "huge", key: tokens})
    # every span taken passes the aggregator's own check (which refuses more than MAX_TOKENS)
    assert [span_error(s, s.hostname, NOW + 300 * 10**9) for s in receiver.spans] == [None] * len(receiver.spans)
    assert [s.request_id for s in receiver.spans] == ["good"]
    assert response.partial_success.rejected_spans == 1
    assert "1 bad_attribute" in response.partial_success.error_message
    assert key in response.partial_success.error_message
    assert receiver.counts().rejected["bad_attribute"] == 1


def test_max_tokens_itself_is_taken(receiver: Receiver) -> None:
    response = _export_good_and(receiver, {"gen_ai.request.id": "max", "gen_ai.usage.prompt_tokens": MAX_TOKENS})
    assert response.partial_success.rejected_spans == 0
    assert [s.input_tokens for s in receiver.spans] == [812, MAX_TOKENS]


@pytest.mark.parametrize(
    ("attributes", "resource", "key"),
    [
        ({"gen_ai.request.id": "a\0b"}, None, "gen_ai.request.id"),
        ({"gen_ai.response.model": "llama\0"}, None, "gen_ai.response.model"),
        ({"wattmeter.tenant": "ac\0me"}, None, "wattmeter.tenant"),
        ({"wattmeter.workload": "w\0"}, None, "wattmeter.workload"),
        ({}, RESOURCE | {"service.name": "vl\0lm"}, "service.name"),
        ({}, RESOURCE | {"host.name": "gpu\0-01"}, "host.name"),
    ],
    ids=["request id", "model", "tenant", "workload", "service name", "host name"],
)
def test_text_with_a_nul_character_is_rejected(
    receiver: Receiver, attributes: dict[str, Any], resource: dict[str, Any] | None, key: str
) -> None:
    response = _export_good_and(receiver, attributes, resource)
    assert all(span_error(s, s.hostname, NOW + 300 * 10**9) is None and "\0" not in s.hostname for s in receiver.spans)
    assert [s.request_id for s in receiver.spans] == ["good"]  # the bad span costs itself only
    assert response.partial_success.rejected_spans == 1
    assert f"{key} contains a NUL character" in response.partial_success.error_message


def test_the_aggregator_does_not_store_a_span_of_2_62_tokens(aggregator: RunningAggregator) -> None:
    """End to end: the huge count never reaches the store (where the request's token sums overflow int64)."""
    now = time.time_ns()
    huge = otlp_span(vllm(**{"gen_ai.request.id": "huge", "gen_ai.usage.prompt_tokens": 2**62}), start=now - 10**10,
                     end=now - 10**9)  # fmt: skip
    good = otlp_span(vllm(**{"gen_ai.request.id": "good"}), start=now - 10**10, end=now - 10**9)
    response = export(aggregator.target, export_request([huge, good]))
    assert response.partial_success.rejected_spans == 1
    stored = aggregator.aggregator.store.request_spans(["huge", "good"])
    assert [(s.request_id, s.input_tokens) for s in stored] == [("good", 812)]


def test_the_same_span_twice_in_one_export_is_stored_once(aggregator: RunningAggregator) -> None:
    now = time.time_ns()
    span = otlp_span(vllm(), start=now - 10**10, end=now - 10**9)
    assert export(aggregator.target, export_request([span, span])).partial_success.rejected_spans == 0
    export(aggregator.target, export_request([span]))  # and sent again (an exporter's retry)
    assert len(aggregator.aggregator.store.request_spans(["chatcmpl-1"])) == 1
    result = aggregator.aggregator.store.request("chatcmpl-1")
    assert result is not None and (result.input_tokens, result.output_tokens, result.spans) == (812, 256, 1)
