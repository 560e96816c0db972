"""Review of ``ReportSpans``: mixed good and bad spans, size limits, garbage, idempotence, spans of one request on
several hosts, auth, store failures, deadlines and concurrent senders, on a real aggregator."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from collector.proto import wattmeter_pb2 as pb
from tests.aggregator.conftest import AggregatorFactory, RunningAggregator, now_ns
from tests.fakes.certs import Pki, make_pki
from tests.fakes.threads import run_in_threads

SECOND = 1_000_000_000
METHOD = "/wattmeter.v1.Telemetry/ReportSpans"
TOKEN_A = "token-for-host-a-0123456789"
Report = Callable[..., pb.SpanReportResult]


def reporter(channel: grpc.Channel) -> Report:
    return channel.unary_unary(
        METHOD,
        request_serializer=pb.SpanReport.SerializeToString,
        response_deserializer=pb.SpanReportResult.FromString,
    )


def span(request_id: str, span_id: str = "", host: str = "host-a", start: int = 0, **fields: object) -> pb.RequestSpan:
    start = start or now_ns() - 10 * SECOND
    values: dict[str, object] = {"end_ns": start + SECOND, "input_tokens": 10, "output_tokens": 5, **fields}
    return pb.RequestSpan(request_id=request_id, span_id=span_id, hostname=host, start_ns=start, **values)  # type: ignore[arg-type]


def tokens(running: RunningAggregator, request_id: str) -> tuple[int, int, int]:
    """(input tokens, output tokens, spans) of a stored request, as its row and its spans say."""
    result = running.aggregator.store.request(request_id)
    assert result is not None
    spans = running.aggregator.store.request_spans([request_id])
    assert (sum(s.input_tokens for s in spans), sum(s.output_tokens for s in spans)) == (
        result.input_tokens,
        result.output_tokens,
    ), "the request's row and its stored spans disagree"
    return result.input_tokens, result.output_tokens, len(spans)


def failed_call_of_two_spans(
    running: RunningAggregator, call: Report, request_id: str, write: Callable[..., object], timeout_s: float
) -> tuple[pb.SpanReport, grpc.RpcError]:
    """With ``write`` in place of the store's ``write_span_columns``, a call of two spans of ``request_id`` that
    fails: the report (to send again) and the error."""
    running.aggregator.store.write_span_columns = write  # type: ignore[method-assign]
    report = pb.SpanReport(spans=[span(request_id, "s1"), span(request_id, "s2")])
    with pytest.raises(grpc.RpcError) as raised:
        call(report, timeout=timeout_s)
    return report, raised.value


@pytest.fixture
def call(aggregator: RunningAggregator) -> Iterator[Report]:
    with grpc.insecure_channel(aggregator.target) as channel:
        yield reporter(channel)


# -- good and bad spans in one call


def test_good_spans_of_a_call_are_stored_beside_bad_ones(aggregator: RunningAggregator, call: Report) -> None:
    start = now_ns() - 10 * SECOND
    report = pb.SpanReport(
        spans=[
            span("good-1", "s1", start=start),
            span("", "s2", start=start),  # no request id
            span("bad-time", "s3", start=start, end_ns=start - 1),
            span("good-2", "s4", start=start),
            span("future", "s5", start=start, end_ns=now_ns() + 3600 * SECOND),
            span("tokens", "s6", start=start, input_tokens=2**40),
            span("nul", "s7\0", start=start),
            span("labels", "s8", start=start, labels={f"k{i}": "v" for i in range(100)}),
            span("good-3", "s9", start=start, prefill_end_ns=start + 1, queue_end_ns=start + 1),
            span("prefill", "s10", start=start, prefill_end_ns=start + 2 * SECOND),
        ]
    )
    result = call(report, timeout=30)
    assert (result.accepted, result.rejected) == (3, 7)
    assert len(result.errors) == 5  # at most a few lines
    assert "request_id is empty" in result.errors[0]
    assert "bad-time" in result.errors[1] and "not a time span" in result.errors[1]
    assert "future" in result.errors[2]
    stored = aggregator.aggregator.store.request_spans(["good-1", "good-2", "good-3", "bad-time", "nul", "prefill"])
    assert sorted(s.request_id for s in stored) == ["good-1", "good-2", "good-3"]
    assert dict(aggregator.aggregator.metrics.spans) == {"accepted": 3, "rejected": 7}


def test_all_spans_bad_stores_nothing_and_says_why(aggregator: RunningAggregator, call: Report) -> None:
    result = call(pb.SpanReport(spans=[span("a", host=""), span("b", start=1, end_ns=0)]), timeout=30)
    assert (result.accepted, result.rejected) == (0, 2)
    assert "hostname is empty" in result.errors[0]
    assert aggregator.aggregator.store.request_spans(["a", "b"]) == []


def test_an_empty_call_is_answered_with_zeros(call: Report) -> None:
    result = call(pb.SpanReport(), timeout=30)
    assert (result.accepted, result.rejected, list(result.errors)) == (0, 0, [])


# -- size and garbage


def test_100000_spans_in_one_call(aggregator: RunningAggregator, call: Report) -> None:
    start = now_ns() - 60 * SECOND
    report = pb.SpanReport(spans=[span(f"r{i % 25000}", f"s{i}", start=start + i) for i in range(100_000)])
    assert report.ByteSize() < 16 * 1024 * 1024
    result = call(report, timeout=120)
    assert (result.accepted, result.rejected) == (100_000, 0)
    assert tokens(aggregator, "r7") == (40, 20, 4)
    again = call(report, timeout=120)  # the same call again: stored once
    assert again.accepted == 100_000
    assert tokens(aggregator, "r7") == (40, 20, 4)


def test_a_call_over_the_message_size_is_refused_clearly(start_aggregator: AggregatorFactory) -> None:
    running = start_aggregator(grpc={"listen": "127.0.0.1:0", "max_message_bytes": 64 * 1024})
    start = now_ns() - 10 * SECOND
    report = pb.SpanReport(spans=[span(f"r{i}", f"s{i}", start=start) for i in range(5000)])
    assert report.ByteSize() > 64 * 1024
    with grpc.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            reporter(channel)(report, timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert running.aggregator.store.request_spans(["r1"]) == []
        # the server is still fine for the next call
        assert reporter(channel)(pb.SpanReport(spans=[span("ok", "s")]), timeout=30).accepted == 1


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff",
        b"\x0a\x09\x0a\x03abc",  # spans: a RequestSpan cut short
        b"\x0a\x04\x0a\x02\xff\xfe",  # a request_id that is not UTF-8
        b"\x0b",  # a group start
        b"GET / HTTP/1.1\r\n\r\n",
        bytes(range(256)) * 4,
    ],
)
def test_bytes_that_are_not_a_span_report_are_invalid_argument(aggregator: RunningAggregator, data: bytes) -> None:
    with grpc.insecure_channel(aggregator.target) as channel:
        garbage = channel.unary_unary(METHOD)
        with pytest.raises(grpc.RpcError) as raised:
            garbage(data, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert "not a wattmeter.v1.SpanReport" in (raised.value.details() or "")
        # the next good call on the same channel goes through
        assert reporter(channel)(pb.SpanReport(spans=[span("after", "s")]), timeout=30).accepted == 1


# -- idempotence and spans on several hosts


def test_the_same_span_twice_in_one_call_counts_once(aggregator: RunningAggregator, call: Report) -> None:
    start = now_ns() - 10 * SECOND
    one = span("dup", "s1", start=start)
    unnamed = span("dup-derived", "", start=start)  # derived span id: the same for both copies
    result = call(pb.SpanReport(spans=[one, one, unnamed, unnamed]), timeout=30)
    assert result.rejected == 0
    assert tokens(aggregator, "dup") == (10, 5, 1)
    assert tokens(aggregator, "dup-derived") == (10, 5, 1)


def test_the_same_span_across_calls_counts_once(aggregator: RunningAggregator, call: Report) -> None:
    start = now_ns() - 10 * SECOND
    for _ in range(3):
        assert call(pb.SpanReport(spans=[span("again", "s1", start=start), span("again-d", start=start)])).accepted
    assert tokens(aggregator, "again") == (10, 5, 1)
    assert tokens(aggregator, "again-d") == (10, 5, 1)
    # a new span of the request, then the first one again beside it: only the new one adds
    call(pb.SpanReport(spans=[span("again", "s2", start=start + SECOND)]), timeout=30)
    call(pb.SpanReport(spans=[span("again", "s1", start=start), span("again", "s2", start=start + SECOND)]))
    assert tokens(aggregator, "again") == (20, 10, 2)


def test_spans_of_one_request_on_several_hosts_add_up(aggregator: RunningAggregator, call: Report) -> None:
    start = now_ns() - 10 * SECOND
    call(pb.SpanReport(spans=[span("multi", "pre", host="host-a", start=start, input_tokens=100, output_tokens=0)]))
    later = start + 2 * SECOND
    call(pb.SpanReport(spans=[span("multi", "dec", host="host-b", start=later, input_tokens=0, output_tokens=50)]))
    assert tokens(aggregator, "multi") == (100, 50, 2)
    result = aggregator.aggregator.store.request("multi")
    assert result is not None and set(result.hosts) == {"host-a", "host-b"}
    # both sent again, in one call and in the other order: nothing adds
    call(
        pb.SpanReport(
            spans=[
                span("multi", "dec", host="host-b", start=later, input_tokens=0, output_tokens=50),
                span("multi", "pre", host="host-a", start=start, input_tokens=100, output_tokens=0),
            ]
        )
    )
    assert tokens(aggregator, "multi") == (100, 50, 2)


# -- auth


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["host-a", "host-b"])


def tls_channel(running: RunningAggregator, ca: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    return grpc.secure_channel(running.target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


@pytest.fixture
def with_tokens(start_aggregator: AggregatorFactory, pki: Pki) -> RunningAggregator:
    digest = "sha256:" + hashlib.sha256(TOKEN_A.encode()).hexdigest()
    return start_aggregator(
        grpc={"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "agent_tokens": {"host-a": digest}}
    )


def test_spans_for_a_host_the_token_is_not_for_are_refused(with_tokens: RunningAggregator, pki: Pki) -> None:
    metadata = [("authorization", f"Bearer {TOKEN_A}")]
    with tls_channel(with_tokens, pki.ca_cert) as channel:
        call = reporter(channel)
        assert call(pb.SpanReport(spans=[span("mine", "s")]), timeout=30, metadata=metadata).accepted == 1
        with pytest.raises(grpc.RpcError) as raised:
            call(pb.SpanReport(spans=[span("theirs", "s", host="host-b")]), timeout=30, metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "host-b" in (raised.value.details() or "")
        with pytest.raises(grpc.RpcError) as raised:
            call(pb.SpanReport(spans=[span("anon", "s")]), timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert with_tokens.aggregator.store.request_spans(["theirs", "anon"]) == []


def test_many_foreign_hosts_get_a_short_clear_permission_error(with_tokens: RunningAggregator, pki: Pki) -> None:
    """A sender misconfigured with thousands of hostnames (or a hostile one): the status's details must stay a
    readable line, not every hostname (trailers are limited: a huge message turns into another error)."""
    metadata = [("authorization", f"Bearer {TOKEN_A}")]
    start = now_ns() - 10 * SECOND
    report = pb.SpanReport(spans=[span(f"r{i}", "s", host=f"{i:05d}-" + "h" * 250, start=start) for i in range(2000)])
    with tls_channel(with_tokens, pki.ca_cert) as channel, pytest.raises(grpc.RpcError) as raised:
        reporter(channel)(report, timeout=30, metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
    assert len(raised.value.details() or "") < 4096


def test_a_span_with_no_hostname_is_rejected_alone_when_tokens_are_configured(
    with_tokens: RunningAggregator, pki: Pki
) -> None:
    """An empty hostname is a malformed span (rejected on its own, with its reason), not a claim to speak for
    another host: it must not cost the call's good spans."""
    metadata = [("authorization", f"Bearer {TOKEN_A}")]
    with tls_channel(with_tokens, pki.ca_cert) as channel:
        result = reporter(channel)(
            pb.SpanReport(spans=[span("good", "s"), span("nameless", "s", host="")]), timeout=30, metadata=metadata
        )
    assert (result.accepted, result.rejected) == (1, 1)
    assert "hostname is empty" in result.errors[0]
    assert [s.request_id for s in with_tokens.aggregator.store.request_spans(["good", "nameless"])] == ["good"]


# -- failures and deadlines


def test_a_store_failure_is_unavailable_and_a_retry_stores_once(aggregator: RunningAggregator, call: Report) -> None:
    store = aggregator.aggregator.store
    real = store.write_span_columns
    failures = [RuntimeError("disk full")]

    def failing(spans):  # type: ignore[no-untyped-def]
        if failures:
            real(spans)  # committed, but the answer is lost
            raise failures.pop()
        return real(spans)

    report, error = failed_call_of_two_spans(aggregator, call, "retry", failing, timeout_s=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not store the spans" in (error.details() or "")
    assert call(report, timeout=30).accepted == 2
    assert tokens(aggregator, "retry") == (20, 10, 2)


def test_a_store_failure_with_a_long_message_is_still_unavailable(aggregator: RunningAggregator, call: Report) -> None:
    """The status must reach the client as UNAVAILABLE (which senders retry), however long the store's error is."""

    def failing(spans):  # type: ignore[no-untyped-def]
        raise RuntimeError("constraint failed: " + "x" * 20_000)

    aggregator.aggregator.store.write_span_columns = failing  # type: ignore[method-assign]
    with pytest.raises(grpc.RpcError) as raised:
        call(pb.SpanReport(spans=[span("long-error", "s1")]), timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()
    assert "could not store the spans" in (raised.value.details() or "")


def test_a_huge_call_of_empty_spans_does_not_stall_other_calls(aggregator: RunningAggregator) -> None:
    """1,000,000 empty spans (2 MB, well under the message limit) are all rejected; while they are checked, the
    aggregator must go on answering other calls (agents' streams, health checks, other senders)."""
    done: dict[str, float] = {}
    with grpc.insecure_channel(aggregator.target) as big, grpc.insecure_channel(aggregator.target) as small:
        garbage = big.unary_unary(METHOD, response_deserializer=pb.SpanReportResult.FromString)
        answers: list[pb.SpanReportResult] = []

        def send_big() -> None:
            answers.append(garbage(b"\x0a\x00" * 1_000_000, timeout=300))
            done["big"] = time.monotonic()

        thread = threading.Thread(target=send_big)
        thread.start()
        time.sleep(1.0)  # the big call is in the server's hands
        assert "big" not in done
        assert reporter(small)(pb.SpanReport(spans=[span("meanwhile", "s")]), timeout=300).accepted == 1
        done["small"] = time.monotonic()
        thread.join(300)
    assert answers and (answers[0].accepted, answers[0].rejected) == (0, 1_000_000)
    assert answers[0].errors[0] == "request_id is empty"
    assert done["small"] < done["big"], "the small call waited for the big one: the event loop was blocked"


def test_a_deadline_past_mid_call_then_a_retry_stores_once(aggregator: RunningAggregator, call: Report) -> None:
    store = aggregator.aggregator.store
    real = store.write_span_columns
    slow = threading.Event()

    def delayed(spans):  # type: ignore[no-untyped-def]
        if not slow.is_set():
            slow.set()
            time.sleep(1.0)  # past the client's deadline
        return real(spans)

    report, error = failed_call_of_two_spans(aggregator, call, "late", delayed, timeout_s=0.2)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.5)
    assert call(report, timeout=30).accepted == 2
    assert tokens(aggregator, "late") == (20, 10, 2)
    # the aggregator goes on serving
    assert call(pb.SpanReport(spans=[span("next", "s")]), timeout=30).accepted == 1


# -- concurrent senders


@pytest.fixture(params=["sqlite", "postgres"])
def any_backend(request: pytest.FixtureRequest, start_aggregator: AggregatorFactory) -> RunningAggregator:
    if request.param == "sqlite":
        return start_aggregator()
    url = request.getfixturevalue("postgres_url")
    return start_aggregator(storage={"url": url})


def test_eight_threads_sending_overlapping_spans(any_backend: RunningAggregator) -> None:
    """8 senders, each sending the spans of the same 200 requests (4 spans a request, on 2 hosts) in its own order
    and its own slices: every span is stored once, every request counts each span's tokens once."""
    start = now_ns() - 60 * SECOND
    requests = [f"req-{i}" for i in range(200)]
    spans = [
        span(rid, f"s{k}", host=f"host-{k % 2}", start=start + i * 1000 + k, input_tokens=k + 1, output_tokens=1)
        for i, rid in enumerate(requests)
        for k in range(4)
    ]
    barrier = threading.Barrier(8)

    def sender(n: int) -> None:
        with grpc.insecure_channel(any_backend.target) as channel:
            call = reporter(channel)
            mine = spans[n:] + spans[:n] if n % 2 else list(reversed(spans))
            barrier.wait(30)
            for offset in range(0, len(mine), 37 + n):
                result = call(pb.SpanReport(spans=mine[offset : offset + 37 + n]), timeout=60)
                assert result.rejected == 0, list(result.errors)

    assert run_in_threads(sender, 8, timeout_s=120) == []
    store = any_backend.aggregator.store
    stored = store.request_spans(requests)
    assert len(stored) == len(spans)
    for rid in requests[::17]:
        assert tokens(any_backend, rid) == (10, 4, 4)


def test_eight_threads_sending_the_same_calls_at_once(any_backend: RunningAggregator) -> None:
    """The same calls from 8 senders at the same instant (a retry storm): the requests are new to all of them, so
    their writes race to insert the same request rows; each span must still count once."""
    start = now_ns() - 60 * SECOND
    rounds = [
        [
            span(f"same-{r}-{i}", f"s{k}", host=f"host-{k}", start=start + i * 1000, input_tokens=1, output_tokens=2)
            for i in range(50)
            for k in range(3)
        ]
        for r in range(5)
    ]
    barrier = threading.Barrier(8)

    def sender(_: int) -> None:
        with grpc.insecure_channel(any_backend.target) as channel:
            call = reporter(channel)
            for spans in rounds:
                barrier.wait(60)
                assert call(pb.SpanReport(spans=spans), timeout=60).accepted == len(spans)

    assert run_in_threads(sender, 8, timeout_s=180) == []
    for r in range(5):
        for i in (0, 17, 49):
            assert tokens(any_backend, f"same-{r}-{i}") == (3, 6, 3)
