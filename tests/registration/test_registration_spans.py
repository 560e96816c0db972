"""The registration server's span messages over a real Unix socket: fields, the pid from SO_PEERCRED, each refusal."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from collector.registration import MAX_TOKENS, RegistrationServer, SpanEvent
from tests.fakes.registration_world import Recorder, connect, line
from tests.fakes.waiting import wait_for

NOW = time.time_ns()  # spans in these tests are a few seconds old, well within the agent's bounds
START = NOW - 5_000_000_000
END = NOW - 1_000_000_000


def span_line(request_id: object = "req-1", start_ns: object = START, end_ns: object = END, **extra: object) -> bytes:
    return line({"v": 1, "type": "span", "request_id": request_id, "start_ns": start_ns, "end_ns": end_ns, **extra})


def test_a_span_with_every_field(server: RegistrationServer, recorder: Recorder) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(
            span_line(
                model="llama-70b",
                tenant="acme",
                workload="serve-a",
                labels={"route": "chat"},
                input_tokens=512,
                output_tokens=MAX_TOKENS,
                queue_end_ns=START + 10,
                prefill_end_ns=START + 10,  # no time in prefill is possible
                pid=1,  # not the client's to say
                hostname="elsewhere",
                future_field=[1, 2],  # fields are only ever added: unknown ones are ignored
            )
        )
        wait_for(lambda: recorder.spans)
    assert recorder.spans[0] == SpanEvent(
        pid=os.getpid(),
        uid=os.getuid(),
        gid=os.getgid(),
        request_id="req-1",
        start_ns=START,
        end_ns=END,
        model="llama-70b",
        tenant="acme",
        workload="serve-a",
        labels={"route": "chat"},
        input_tokens=512,
        output_tokens=MAX_TOKENS,
        prefill_end_ns=START + 10,
        queue_end_ns=START + 10,
    )
    assert (server.accepted, server.spans_accepted, server.spans_refused, server.errors) == (1, 1, 0, 0)


def test_a_minimal_span_gets_the_defaults_and_registers_nothing(server: RegistrationServer, recorder: Recorder) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(span_line("r", START, START))  # zero length is a span too
        sock.sendall(line({"v": 1, "type": "phase", "phase": "inference"}))  # still not registered
        wait_for(lambda: server.error_counts["not_registered"] == 1)
    span = recorder.spans[0]
    assert (span.model, span.tenant, span.workload, dict(span.labels)) == ("", "", "", {})
    assert (span.input_tokens, span.output_tokens, span.queue_end_ns, span.prefill_end_ns) == (0, 0, 0, 0)
    assert span.start_ns == span.end_ns == START
    wait_for(lambda: server.connections == 0)
    assert recorder.events == [] and recorder.disconnects == []  # no registration to end


def test_a_span_leaves_the_connections_registration_alone(server: RegistrationServer, recorder: Recorder) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(line({"v": 1, "type": "register", "workload": "w", "phase": "training", "job": "j"}))
        sock.sendall(span_line(workload="other"))
        sock.sendall(line({"v": 1, "type": "phase", "phase": "inference"}))
        wait_for(lambda: len(recorder.events) == 2)
    assert [(e.kind, e.workload, e.phase, e.job) for e in recorder.events] == [
        ("register", "w", "training", "j"),
        ("phase", "w", "inference", "j"),
    ]
    assert [s.workload for s in recorder.spans] == ["other"]
    wait_for(lambda: recorder.disconnects == [os.getpid()])


DAY_NS = 24 * 3600 * 10**9

REFUSED = [
    pytest.param(span_line(request_id=None), "request_id", id="request-id-missing"),
    pytest.param(span_line(request_id=""), "request_id", id="request-id-empty"),
    pytest.param(span_line(request_id="r" * 257), "request_id", id="request-id-long"),
    pytest.param(span_line(request_id=17), "request_id", id="request-id-number"),
    pytest.param(span_line(request_id="a\nb"), "request_id", id="request-id-control"),
    pytest.param(line({"v": 1, "type": "span", "request_id": "r", "end_ns": END}), "time", id="start-missing"),
    pytest.param(line({"v": 1, "type": "span", "request_id": "r", "start_ns": START}), "time", id="end-missing"),
    pytest.param(span_line(start_ns=float(START)), "time", id="start-float"),
    pytest.param(span_line(end_ns=True), "time", id="end-bool"),
    pytest.param(span_line(start_ns=str(START)), "time", id="start-string"),
    pytest.param(span_line(start_ns=START // 10**9, end_ns=END // 10**9), "time", id="seconds"),
    pytest.param(span_line(start_ns=0, end_ns=END), "time", id="start-zero"),
    pytest.param(span_line(start_ns=END, end_ns=START), "time", id="end-before-start"),
    pytest.param(span_line(start_ns=END - DAY_NS - 1), "time", id="longer-than-a-day"),
    pytest.param(span_line(start_ns=NOW + 3600 * 10**9, end_ns=NOW + 3601 * 10**9), "time", id="future"),
    pytest.param(span_line(start_ns=NOW - 8 * DAY_NS, end_ns=NOW - 8 * DAY_NS + 1), "time", id="week-old"),
    pytest.param(span_line(end_ns=2**64 + 5), "time", id="end-past-uint64"),
    pytest.param(span_line(queue_end_ns=START - 1), "time", id="queue-end-before-start"),
    pytest.param(span_line(prefill_end_ns=END + 1), "time", id="prefill-end-after-end"),
    pytest.param(span_line(queue_end_ns=START + 2, prefill_end_ns=START + 1), "time", id="prefill-before-queue-end"),
    pytest.param(span_line(prefill_end_ns=float(START + 1)), "time", id="prefill-float"),
    pytest.param(span_line(input_tokens=-1), "field", id="tokens-negative"),
    pytest.param(span_line(output_tokens=MAX_TOKENS + 1), "field", id="tokens-past-2-40"),
    pytest.param(span_line(output_tokens=1.0), "field", id="tokens-float"),
    pytest.param(span_line(input_tokens=True), "field", id="tokens-bool"),
    pytest.param(span_line(input_tokens="12"), "field", id="tokens-string"),
    pytest.param(span_line(model="m" * 257), "field", id="model-long"),
    pytest.param(span_line(model=["m"]), "field", id="model-not-string"),
    pytest.param(span_line(tenant="t" * 257), "field", id="tenant-long"),
    pytest.param(span_line(tenant=None), "field", id="tenant-null"),
    pytest.param(span_line(workload="has space"), "workload", id="workload-chars"),
    pytest.param(span_line(workload=3), "workload", id="workload-number"),
    pytest.param(span_line(labels={"k": 1}), "field", id="label-not-string"),
    pytest.param(span_line(labels={f"k{n}": "v" for n in range(17)}), "field", id="labels-too-many"),
    pytest.param(span_line(labels={"bad name": "v"}), "field", id="label-name"),
    pytest.param(span_line(labels={"k": "v" * 257}), "field", id="label-value-long"),
    pytest.param(span_line(labels="k=v"), "field", id="labels-not-object"),
]


@pytest.mark.parametrize(("data", "reason"), REFUSED)
def test_a_refused_span_is_counted_and_the_connection_keeps_serving(
    server: RegistrationServer, recorder: Recorder, data: bytes, reason: str
) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(data)
        sock.sendall(span_line("good"))  # the same connection is still usable
        wait_for(lambda: recorder.spans)
    assert [s.request_id for s in recorder.spans] == ["good"]
    assert server.error_counts[reason] == 1
    assert (server.errors, server.spans_refused, server.spans_accepted) == (1, 1, 1)


def test_the_bounds_themselves_are_accepted(server: RegistrationServer, recorder: Recorder) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(
            span_line(
                "r" * 256,
                END - DAY_NS,
                END,
                model="m" * 256,
                tenant="t" * 256,
                workload="w" * 128,
                labels={f"k{n}": "v" * 256 for n in range(16)},
                input_tokens=0,
                output_tokens=MAX_TOKENS,
                queue_end_ns=END - DAY_NS,
                prefill_end_ns=END,
            )
        )
        wait_for(lambda: recorder.spans)
    assert server.errors == 0
    assert len(recorder.spans[0].labels) == 16


def test_spans_are_rate_limited_like_every_message(
    make_server: Callable[..., RegistrationServer], recorder: Recorder
) -> None:
    server = make_server(max_messages_per_s=5.0)
    flood = 200
    with connect(server.socket_path) as sock:
        sock.sendall(b"".join(span_line(f"r{i}") for i in range(flood)))
        wait_for(lambda: server.spans_accepted + server.error_counts["rate_limited"] == flood)
    assert server.spans_accepted < flood // 2
    wait_for(lambda: len(recorder.spans) == server.spans_accepted)  # counted just before the callback runs


def test_without_on_span_spans_are_accepted_and_counted(make_server: Callable[..., RegistrationServer]) -> None:
    server = make_server(on_span=None)
    with connect(server.socket_path) as sock:
        sock.sendall(span_line() * 3)
        wait_for(lambda: server.spans_accepted == 3)
    assert server.errors == 0 and server.callback_errors == 0


def test_a_failing_span_callback_is_counted_and_the_server_keeps_serving(
    make_server: Callable[..., RegistrationServer], recorder: Recorder
) -> None:
    def explode(event: SpanEvent) -> None:
        recorder.spans.append(event)
        if event.request_id == "boom":
            raise RuntimeError("callback bug")

    server = make_server(on_span=explode)
    with connect(server.socket_path) as sock:
        sock.sendall(span_line("boom") + span_line("next"))
        wait_for(lambda: len(recorder.spans) == 2)
    assert server.callback_errors == 1
    assert server.spans_accepted == 2
