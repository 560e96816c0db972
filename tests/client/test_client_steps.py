"""collector.client.step(): counted in process, flushed about once a second, before phase changes and at exit, to
the real registration server on a Unix socket in tmp_path."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import collector.client as client
from collector.registration import RegistrationServer, StepsEvent
from tests.fakes.client_world import GENEROUS_S, run_python, run_with_hang_guard
from tests.fakes.registration_world import Recorder
from tests.fakes.waiting import wait_for


class StepsRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[StepsEvent] = []

    def on_steps(self, event: StepsEvent) -> None:
        self.steps.append(event)

    def total(self, pid: int | None = None) -> int:
        return sum(event.count for event in list(self.steps) if pid is None or event.pid == pid)


@pytest.fixture
def steps_recorder() -> StepsRecorder:
    return StepsRecorder()


@pytest.fixture
def steps_server(socket_path: Path, steps_recorder: StepsRecorder) -> Iterator[RegistrationServer]:
    server = RegistrationServer(
        socket_path,
        max_messages_per_s=1e9,
        on_register=steps_recorder.on_register,
        on_disconnect=steps_recorder.on_disconnect,
        on_span=steps_recorder.on_span,
        on_steps=steps_recorder.on_steps,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def step_counters(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for counter in ("steps_sent", "steps_dropped"):
        monkeypatch.setattr(client, counter, 0)
    yield
    client._client.steps_used = False  # the test's client state is closed: let its watcher thread end


def client_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wattmeter.client" and r.levelno >= logging.WARNING]


# --- with an agent --------------------------------------------------------------------------------------


def test_steps_from_many_threads_add_up_in_few_messages(
    fresh_client: client._Client, steps_server: RegistrationServer, steps_recorder: StepsRecorder
) -> None:
    def loop() -> None:
        for _ in range(2500):
            client.step()

    started = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    client.step(5)
    for thread in threads:
        thread.join(GENEROUS_S)
    wait_for(lambda: steps_recorder.total() == 10_005)
    elapsed_s = time.monotonic() - started
    assert steps_recorder.total(os.getpid()) == 10_005
    # one message per flush (about a second apart), never one per call
    assert len(steps_recorder.steps) <= elapsed_s / client.STEPS_FLUSH_INTERVAL_S + 2
    wait_for(lambda: client.steps_sent == 10_005)  # counted just after the send returns, so after the agent may read it
    assert (client.steps_dropped, client.dropped, fresh_client.steps_pending) == (0, 0, 0)
    assert steps_recorder.events == []  # steps register nothing
    assert steps_server.errors == 0


def test_flushes_are_about_a_second_apart(
    fresh_client: client._Client, steps_server: RegistrationServer, steps_recorder: StepsRecorder
) -> None:
    deadline = time.monotonic() + 2.5
    calls = 0
    while time.monotonic() < deadline:
        client.step()
        calls += 1
        time.sleep(0.001)
    wait_for(lambda: steps_recorder.total() == calls, timeout_s=GENEROUS_S)
    # the first flush goes at once, then one per second: 3 in 2.5 s (4 if a flush fell exactly at the end)
    assert 2 <= len(steps_recorder.steps) <= 4, [event.count for event in steps_recorder.steps]


def test_steps_before_a_phase_change_count_under_the_old_phase(
    fresh_client: client._Client,
    steps_server: RegistrationServer,
    steps_recorder: StepsRecorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg = client.register("llama-ft", "training", "77")
    wait_for(lambda: steps_recorder.events)
    monkeypatch.setattr(client, "STEPS_FLUSH_INTERVAL_S", 3600.0)  # only the phase change flushes from here on
    client.step()
    wait_for(lambda: steps_recorder.total() == 1)  # the watcher's first flush goes at once
    client.step(10)
    with reg.phase("inference"):
        client.step(3)
    client.step(2)
    reg.close()
    wait_for(lambda: steps_recorder.disconnects)
    assert [(e.count, e.registration and e.registration.phase) for e in steps_recorder.steps] == [
        (1, "training"),
        (10, "training"),
        (3, "inference"),
        (2, "training"),  # sent before close() ended the registration
    ]
    wait_for(lambda: client.steps_sent == 16)  # counted just after the send returns


def test_a_full_socket_buffer_keeps_the_count_for_a_later_flush(
    fresh_client: client._Client, socket_path: Path
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(1)
    try:
        client.register("w", "training")
        conn, _ = listener.accept()
        with conn:
            start = time.time_ns() - 10**9
            while client.spans_dropped == 0:  # an agent that does not read: the client's buffer fills
                client.report_span("r" * 200, start, start + 1)
            client.step(42)
            fresh_client.flush_steps()
            with fresh_client._lock:  # not while the watcher's flush has the count out (and puts it back)
                assert (fresh_client.steps_pending, client.steps_dropped, client.steps_sent) == (42, 0, 0)
            client.step(8)
            received = b""
            conn.settimeout(0.2)
            deadline = time.monotonic() + GENEROUS_S
            steps: list[object] = []
            while time.monotonic() < deadline and not steps:
                with contextlib.suppress(TimeoutError):
                    received += conn.recv(1 << 20)
                whole_lines = received[: received.rfind(b"\n") + 1].splitlines()
                steps = [json.loads(x) for x in whole_lines if b'"type":"steps"' in x]
        assert steps == [{"v": 1, "type": "steps", "count": 50}]
        wait_for(lambda: client.steps_sent == 50)  # counted just after the send returns
        assert client.steps_dropped == 0
    finally:
        listener.close()


def test_steps_after_the_agent_restarts_reach_the_new_one(
    fresh_client: client._Client, socket_path: Path, steps_recorder: StepsRecorder
) -> None:
    def start() -> RegistrationServer:
        server = RegistrationServer(socket_path, max_messages_per_s=1e9, on_register=lambda e: None)
        server._on_steps = steps_recorder.on_steps
        server.start()
        return server

    first = start()
    client.step(4)
    wait_for(lambda: steps_recorder.total() == 4)
    first.stop()
    second = start()
    try:
        client.step(6)
        wait_for(lambda: steps_recorder.total() == 10)  # the watcher's next flush reconnects
        wait_for(lambda: client.steps_sent == 10)  # counted just after the send returns, so after the agent may read it
        assert client.steps_dropped == 0
    finally:
        second.stop()


# --- without an agent, and bad arguments ---------------------------------------------------------------------


def test_no_agent_drops_and_counts_never_raises_never_blocks(
    fresh_client: client._Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wattmeter.client")
    calls = 100_000

    def loop() -> None:
        for _ in range(calls):
            client.step()

    started = time.perf_counter()
    run_with_hang_guard(loop)
    per_call_us = (time.perf_counter() - started) / calls * 1e6
    wait_for(lambda: client.steps_dropped == calls)
    assert (client.steps_sent, fresh_client.steps_pending) == (0, 0)
    assert client.dropped >= 1  # messages, not steps: one per failed flush
    wait_for(lambda: client_warnings(caplog))  # logged once the flush has let go of the client's lock
    warnings = client_warnings(caplog)
    assert len(warnings) == 1 and "not reachable" in warnings[0]
    assert per_call_us < 50, f"{per_call_us:.2f} us per step() call"  # generous: a loaded 2-core VM


class Index:
    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


class BadIndex:
    def __index__(self) -> int:
        raise RuntimeError("broken")


def test_bad_counts_never_raise_and_warn_once(
    fresh_client: client._Client,
    steps_server: RegistrationServer,
    steps_recorder: StepsRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="wattmeter.client")
    for bad in (-1, 1.5, "3", True, None, client.MAX_STEPS + 1, BadIndex(), [1]):
        client.step(bad)  # type: ignore[arg-type]
    client.step(0)
    assert not fresh_client.steps_used  # nothing was counted: no thread started for it
    client.step(Index(7))  # type: ignore[arg-type]  # numpy integers and the like
    client.step(client.MAX_STEPS)
    wait_for(lambda: steps_recorder.total() == 7 + client.MAX_STEPS)
    warnings = client_warnings(caplog)
    assert sum("step(n) takes an integer" in w for w in warnings) == 1, warnings
    assert sum("step failed" in w for w in warnings) == 1, warnings  # the __index__ that raised


def test_counts_beyond_one_message_go_in_several(
    fresh_client: client._Client, steps_server: RegistrationServer, steps_recorder: StepsRecorder
) -> None:
    for _ in range(3):
        client.step(client.MAX_STEPS)
    wait_for(lambda: steps_recorder.total() == 3 * client.MAX_STEPS, timeout_s=GENEROUS_S)
    assert all(event.count <= client.MAX_STEPS for event in steps_recorder.steps)
    assert steps_server.errors == 0


# --- processes: exit and fork --------------------------------------------------------------------------------


def test_steps_are_flushed_at_exit(
    steps_server: RegistrationServer, steps_recorder: StepsRecorder, socket_path: Path
) -> None:
    code = "import collector.client as c\nfor _ in range(1000):\n    c.step()\nprint(c.steps_sent, c.steps_dropped)\n"
    run_python(code, socket_path)
    wait_for(lambda: steps_recorder.total() == 1000)
    assert {event.pid for event in steps_recorder.steps} != {os.getpid()}


def test_no_agent_at_exit_costs_no_time_and_one_warning(socket_path: Path) -> None:
    code = "import collector.client as c\nfor _ in range(1000):\n    c.step()\n"
    started = time.monotonic()
    result = run_python(code, socket_path)  # nothing listens there
    assert time.monotonic() - started < 10  # the interpreter's start dominates; exit never waits for an agent
    assert result.stderr.count("not reachable") == 1 and "Traceback" not in result.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_sends_the_parents_steps(
    steps_server: RegistrationServer, steps_recorder: StepsRecorder, socket_path: Path
) -> None:
    # In a subprocess: forking pytest itself, with the server's thread running, is asking for trouble.
    code = """
import os, time
import collector.client as c
c.STEPS_FLUSH_INTERVAL_S = 3600.0  # only explicit flushes after the first
c.step()
while c.steps_sent != 1:
    time.sleep(0.01)
c.step(5)
assert c._client.steps_pending == 5
child = os.fork()
if child == 0:
    ok = c._client.steps_pending == 0 and not c._client.steps_used
    c.step(3)
    c._client.flush_steps()
    os._exit(0 if ok and c.steps_sent == 4 else 1)  # 4: the 1 counted before the fork, and the child's 3
_, status = os.waitpid(child, 0)
print(child, status, flush=True)
"""
    result = run_python(code, socket_path)
    child_pid, status = (int(x) for x in result.stdout.split())
    assert status == 0
    wait_for(lambda: steps_recorder.total() == 9)
    parent_pid = next(event.pid for event in steps_recorder.steps if event.pid != child_pid)
    assert (steps_recorder.total(parent_pid), steps_recorder.total(child_pid)) == (6, 3)
