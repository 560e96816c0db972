"""Request spans from collector.client to the real registration server on a Unix socket in tmp_path."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

import collector.client as client
from collector.registration import RegistrationServer, SpanEvent
from tests.fakes.client_world import GENEROUS_S, make_server, run_python, run_with_hang_guard
from tests.fakes.registration_world import Recorder
from tests.fakes.waiting import wait_for


def client_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wattmeter.client" and r.levelno >= logging.WARNING]


# --- with an agent --------------------------------------------------------------------------------------


def test_a_request_span_carries_its_fields_and_times(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    before = time.time_ns()
    with client.request("req-1", model="llama-70b", tenant="acme", labels={"route": "chat"}) as r:
        assert client.current_request() is r
        r.started()
        r.prefill_done()
        r.tokens(input=512)
        r.tokens(output=128)  # a count left out keeps its value
        assert r.sent is None
    after = time.time_ns()
    assert client.current_request() is None
    assert r.sent is True
    wait_for(lambda: recorder.spans)
    span = recorder.spans[0]
    assert (span.pid, span.uid, span.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert (span.request_id, span.model, span.tenant, span.workload, dict(span.labels)) == (
        "req-1",
        "llama-70b",
        "acme",
        "",
        {"route": "chat"},
    )
    assert (span.input_tokens, span.output_tokens) == (512, 128)
    assert before <= span.start_ns <= span.queue_end_ns <= span.prefill_end_ns <= span.end_ns <= after
    assert (span.start_ns, span.end_ns) == (r.start_ns, r.end_ns)
    assert recorder.events == []  # a span registers nothing
    assert (client.spans_sent, client.spans_dropped, client.dropped) == (1, 0, 0)
    assert server.errors == 0


def test_report_span_sends_the_given_times_as_they_are(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    start = time.time_ns() - 3_000_000_000
    sent = client.report_span(
        "req-2",
        start,
        start + 2_000_000_000,
        model="m",
        workload="serve-a",
        input_tokens=10,
        output_tokens=0,
        queue_end_ns=start + 100,
        prefill_end_ns=start + 500_000_000,
    )
    assert sent is True
    wait_for(lambda: recorder.spans)
    assert recorder.spans[0] == SpanEvent(
        pid=os.getpid(),
        uid=os.getuid(),
        gid=os.getgid(),
        request_id="req-2",
        start_ns=start,
        end_ns=start + 2_000_000_000,
        model="m",
        workload="serve-a",
        input_tokens=10,
        output_tokens=0,
        queue_end_ns=start + 100,
        prefill_end_ns=start + 500_000_000,
        span_id=recorder.spans[0].span_id,
    )
    assert re.fullmatch("[0-9a-f]{16}", recorder.spans[0].span_id)


def test_a_span_id_given_travels_and_each_span_gets_its_own_otherwise(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    start = time.time_ns() - 3_000_000_000
    assert client.report_span("req-3", start, start + 1000, span_id="prefill-0")
    assert client.report_span("req-3", start, start + 1000)
    assert client.report_span("req-3", start, start + 1000)
    wait_for(lambda: len(recorder.spans) == 3)
    ids = [span.span_id for span in recorder.spans]
    assert ids[0] == "prefill-0" and len(set(ids)) == 3


def test_a_generated_request_id_and_an_explicit_end(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    first, second = client.request(), client.request("")
    assert first.request_id != second.request_id and len(first.request_id) == 32
    first.end()
    first.end()  # once only
    second.end()
    wait_for(lambda: len(recorder.spans) == 2)
    assert [s.request_id for s in recorder.spans] == [first.request_id, second.request_id]
    assert client.spans_sent == 2


def test_an_exception_in_the_request_is_reported_and_goes_on_unchanged(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    boom = ValueError("the model crashed")
    with pytest.raises(ValueError) as raised, client.request("failing"):
        raise boom
    assert raised.value is boom
    wait_for(lambda: recorder.spans)
    assert recorder.spans[0].request_id == "failing"


def test_spans_from_a_process_that_never_registered_carry_its_pid(
    server: RegistrationServer, recorder: Recorder, socket_path: Path
) -> None:
    code = (
        "import os, collector.client as c\n"
        "with c.request('from-child', model='m') as r:\n"
        "    r.tokens(input=1, output=2)\n"
        "print(os.getpid(), c.spans_sent, c.spans_dropped, flush=True)\n"
    )
    result = run_python(code, socket_path)
    pid, sent, dropped = (int(field) for field in result.stdout.split())
    assert (sent, dropped) == (1, 0)
    wait_for(lambda: recorder.spans)
    assert (recorder.spans[0].pid, recorder.spans[0].request_id) == (pid, "from-child")
    assert pid != os.getpid()
    assert recorder.events == [] and recorder.disconnects == []  # spans alone neither register nor unregister


def test_a_registered_process_sends_spans_on_its_one_connection(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    with client.register("serve", "inference") as reg:
        wait_for(lambda: recorder.events)
        for i in range(3):
            with client.request(f"r{i}"):
                pass
        reg.phase("training")
        wait_for(lambda: len(recorder.spans) == 3 and len(recorder.events) == 2)
        assert server.connections == 1
    # spans change nothing in the registration: the phase message still applied to it
    assert [(e.kind, e.workload, e.phase) for e in recorder.events] == [
        ("register", "serve", "inference"),
        ("phase", "serve", "training"),
    ]
    wait_for(lambda: recorder.disconnects == [os.getpid()])
    client.report_span("after", time.time_ns() - 10, time.time_ns())  # a new connection, on demand
    wait_for(lambda: len(recorder.spans) == 4)
    assert recorder.disconnects == [os.getpid()]


def test_an_agent_restart_costs_no_span(fresh_client: client._Client, socket_path: Path, recorder: Recorder) -> None:
    first = make_server(socket_path, recorder)
    first.start()
    try:
        client.report_span("before", time.time_ns() - 10, time.time_ns())
        wait_for(lambda: recorder.spans)
    finally:
        first.stop()
    second = make_server(socket_path, recorder)
    second.start()
    try:
        # the old connection is found broken at this send: one immediate reconnect, and the span goes
        assert client.report_span("after", time.time_ns() - 10, time.time_ns())
        wait_for(lambda: len(recorder.spans) == 2)
    finally:
        second.stop()
    assert [s.request_id for s in recorder.spans] == ["before", "after"]
    assert (client.spans_sent, client.spans_dropped) == (2, 0)


def test_fields_are_kept_within_the_agents_bounds(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    labels: dict[str, object] = {f"k{i}": "v" for i in range(20)}
    labels.update({"bad name": "x", "long": "v" * 300, "odd": Unprintable()})
    for _ in range(2):  # the second time, nothing more is logged
        with client.request("r\nid" + "x" * 400, model="m" * 300, tenant=7, workload="my model") as r:  # type: ignore[arg-type]
            r.labels = labels  # type: ignore[assignment]
            r.tokens(input=-1, output=2**41)
            r.started(time_ns=1)  # not inside the span
    wait_for(lambda: len(recorder.spans) == 2)
    assert server.errors == 0 and server.spans_refused == 0
    span = recorder.spans[0]
    assert span.request_id == ("r_id" + "x" * 400)[:256]
    assert (span.model, span.tenant, span.workload) == ("m" * 256, "7", "my_model")
    assert dict(span.labels) == {f"k{i}": "v" for i in range(16)}
    assert (span.input_tokens, span.output_tokens, span.queue_end_ns) == (0, 0, 0)
    warnings = client_warnings(caplog)
    # id, model, workload, 2 token counts, queue end, labels, and the label value whose str() raised
    assert len(warnings) == len(set(warnings)) == 8


@pytest.mark.parametrize(
    ("start_ns", "end_ns", "why"),
    [
        pytest.param(int(time.time()), int(time.time()) + 1, "nanoseconds", id="seconds"),
        pytest.param(time.time_ns(), time.time_ns() - 10**9, "ends before it starts", id="backwards"),
        pytest.param(time.time_ns() - 2 * 86400 * 10**9, time.time_ns(), "longer than a day", id="too-long"),
        pytest.param(time.time_ns(), time.time_ns() + 3600 * 10**9, "future", id="future"),
        pytest.param("soon", time.time_ns(), "integers", id="not-a-number"),
    ],
)
def test_unusable_times_drop_the_span_and_count_it(
    fresh_client: client._Client,
    server: RegistrationServer,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
    start_ns: int,
    end_ns: int,
    why: str,
) -> None:
    assert client.report_span("bad", start_ns, end_ns) is False
    assert client.report_span("bad", start_ns, end_ns) is False
    assert (client.spans_dropped, client.dropped, client.spans_sent) == (2, 2, 0)
    warnings = client_warnings(caplog)
    assert len(warnings) == 1 and why in warnings[0]
    client.report_span("good", time.time_ns() - 10, time.time_ns())
    wait_for(lambda: recorder.spans)
    assert [s.request_id for s in recorder.spans] == ["good"]  # nothing of the bad ones reached the agent


def test_spans_from_many_threads_arrive_whole(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    def serve(worker: int) -> None:
        for i in range(200):
            with client.request(f"{worker}-{i}") as r:
                r.tokens(output=i)

    def all_threads() -> None:
        threads = [threading.Thread(target=serve, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run_with_hang_guard(all_threads)
    assert client.spans_sent + client.spans_dropped == 1600
    wait_for(lambda: len(recorder.spans) == client.spans_sent, timeout_s=GENEROUS_S)
    assert server.errors == 0  # no torn or interleaved lines
    assert all(int(s.request_id.split("-")[1]) == s.output_tokens for s in recorder.spans)


def test_internal_errors_are_swallowed_and_logged_once(
    fresh_client: client._Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(data: bytes) -> bool:
        raise RuntimeError("a bug in the client")

    monkeypatch.setattr(fresh_client, "send_span", broken)
    for i in range(5):
        with client.request(f"r{i}") as r:
            pass
        assert r.sent is False
        assert client.report_span("x", time.time_ns() - 10, time.time_ns()) is False
    assert client.spans_dropped == 10
    failures = [m for m in client_warnings(caplog) if "failed" in m]
    assert failures == ["wattmeter client: RequestSpan.end failed; ignored (not logged again)"]


# --- without an agent -----------------------------------------------------------------------------------


def test_no_agent_spans_are_dropped_counted_and_never_block(
    fresh_client: client._Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wattmeter.client")

    def many() -> None:
        for i in range(500):
            with client.request(f"r{i}", model="m") as r:
                r.tokens(input=1, output=1)
            client.report_span(f"p{i}", time.time_ns() - 10, time.time_ns())
            if i % 100 == 0:
                time.sleep(0.06)  # past the retry interval: the retries must stay silent too

    run_with_hang_guard(many)
    assert (client.spans_sent, client.spans_dropped) == (0, 1000)
    assert client.dropped == 1000
    assert len([m for m in client_warnings(caplog) if "not reachable" in m]) == 1
    assert not fresh_client.connected


@pytest.mark.parametrize("sndbuf", [None, 4096], ids=["default-buffer", "small-buffer"])
def test_a_full_socket_buffer_drops_and_counts_spans_and_sends_only_whole_lines(
    fresh_client: client._Client, socket_path: Path, sndbuf: int | None
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(1)  # accepts only after the flood: until then the client's socket buffer fills up
    try:
        assert client.report_span("span-0", time.time_ns() - 10, time.time_ns())  # connects
        if sndbuf is not None:
            # A buffer smaller than a span: lines go out in pieces, and the last one's tail is left for the
            # watcher to finish once the agent reads (a span is a few kB at most, so this is rare, but possible).
            assert fresh_client._sock is not None
            fresh_client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        labels = {f"k{n}": "v" * 250 for n in range(16)}

        def flood() -> None:
            for i in range(1, 5_000):
                client.report_span(f"span-{i}", time.time_ns() - 10, time.time_ns(), labels=labels)

        run_with_hang_guard(flood)
        assert client.spans_dropped > 0
        assert client.spans_sent + client.spans_dropped == 5_000
        sent = client.spans_sent
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(GENEROUS_S)
            received = b""
            while received.count(b"\n") < sent:
                chunk = conn.recv(1 << 20)
                assert chunk, "the client closed the connection"
                received += chunk
        messages = [json.loads(line) for line in received.splitlines()]  # every line whole
        assert len(messages) == sent
        assert {m["type"] for m in messages} == {"span"}
        ids = [int(m["request_id"].split("-")[1]) for m in messages]
        assert ids == sorted(ids)  # in the order reported, with gaps where they were dropped
    finally:
        listener.close()
