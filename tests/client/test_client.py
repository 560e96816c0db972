"""collector.client against the real registration server on a Unix socket in tmp_path (no socket mocks)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import collector.client as client
from collector.registration import RegistrationEvent, RegistrationServer
from tests.fakes.client_world import GENEROUS_S, REPO_ROOT, run_python, run_with_hang_guard, subprocess_env
from tests.fakes.registration_world import Recorder
from tests.fakes.waiting import wait_for


def unreachable_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "wattmeter.client" and "not reachable" in r.getMessage()]


# --- with an agent --------------------------------------------------------------------------------------


def test_pid_of_a_registering_process_comes_from_the_kernel(
    server: RegistrationServer, recorder: Recorder, socket_path: Path
) -> None:
    code = "import collector.client as c; c.register('w', 'training', 'j'); import time; time.sleep(0.5)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(socket_path), cwd=REPO_ROOT)
    try:
        wait_for(lambda: recorder.events, timeout_s=GENEROUS_S)
        event = recorder.events[0]
        assert event.pid == proc.pid != os.getpid()
        assert (event.uid, event.gid) == (os.getuid(), os.getgid())
        assert (event.workload, event.phase, event.job, event.kind) == ("w", "training", "j", "register")
        assert proc.wait(GENEROUS_S) == 0
    finally:
        proc.kill()
    wait_for(lambda: recorder.disconnects == [proc.pid])  # exiting ends the registration


def test_register_as_context_manager_with_phase_changes(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    with client.register("trainer", "training", "job-7", labels={"team": "nlp"}) as reg:
        wait_for(lambda: len(recorder.events) == 1)
        with reg.phase("inference"):
            wait_for(lambda: len(recorder.events) == 2)
            assert reg.current_phase == "inference"
        wait_for(lambda: len(recorder.events) == 3)
        assert reg.current_phase == "training"
        assert recorder.disconnects == []
    wait_for(lambda: recorder.disconnects == [os.getpid()])
    assert recorder.phases() == ["training", "inference", "training"]
    assert [e.kind for e in recorder.events] == ["register", "phase", "phase"]
    assert {(e.pid, e.workload, e.job, e.labels["team"]) for e in recorder.events} == {
        (os.getpid(), "trainer", "job-7", "nlp")
    }
    assert server.errors == 0
    assert client.dropped == 0


def test_nested_phases_restore_in_order(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    with client.register("w", "training") as reg:
        with reg.phase("inference"), reg.phase("unknown"):
            pass
        wait_for(lambda: len(recorder.events) == 5)
    assert recorder.phases() == ["training", "inference", "unknown", "inference", "training"]


def test_plain_call_stays_registered_until_close(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    client.register("server", "inference")  # the result is not kept: the registration must not end with it
    wait_for(lambda: recorder.events)
    reg = client.register("server", "inference", job="second")
    reg.phase("training")  # a plain call applies at once, too
    wait_for(lambda: len(recorder.events) == 3)
    assert recorder.disconnects == []
    client.close()
    wait_for(lambda: recorder.disconnects == [os.getpid()])
    assert [(e.job, e.phase) for e in recorder.events] == [
        ("", "inference"),
        ("second", "inference"),
        ("second", "training"),
    ]


def test_leaving_a_with_block_restores_the_registration_before_it(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    client.register("outer", "inference")
    with client.register("inner", "training"):
        wait_for(lambda: len(recorder.events) == 2)
    wait_for(lambda: len(recorder.events) == 3)
    assert [e.workload for e in recorder.events] == ["outer", "inner", "outer"]
    assert recorder.disconnects == []


def test_repeated_plain_calls_do_not_pile_up(fresh_client: client._Client, server: RegistrationServer) -> None:
    for i in range(100):
        client.register(f"w{i}")
    assert len(fresh_client._stack) <= 2
    wait_for(lambda: server.connections == 1)  # one connection for the whole process
    assert client.dropped == 0


def test_reregisters_by_itself_after_the_agent_restarts(
    fresh_client: client._Client, socket_path: Path, recorder: Recorder
) -> None:
    first = RegistrationServer(socket_path, on_register=recorder.on_register)
    first.start()
    try:
        reg = client.register("w", "training", "j")
        reg.phase("inference")
        wait_for(lambda: len(recorder.events) == 2)
    finally:
        first.stop()
    second_events: list[RegistrationEvent] = []
    second = RegistrationServer(socket_path, on_register=second_events.append)
    second.start()
    try:
        # No further call from the application: the client's watcher notices and registers again, current phase.
        wait_for(lambda: second_events, timeout_s=GENEROUS_S)
        event = second_events[0]
        assert (event.pid, event.workload, event.phase, event.job) == (os.getpid(), "w", "inference", "j")
    finally:
        second.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_speaks_for_itself_and_leaves_the_parents_connection(
    server: RegistrationServer, recorder: Recorder, socket_path: Path
) -> None:
    # In a subprocess: forking pytest itself, with the server's thread running, is asking for trouble.
    code = """
import os, sys, time
import collector.client as c
reg = c.register('w', 'training', 'j')
time.sleep(0.2)
child = os.fork()
if child == 0:
    reg.phase('inference')  # the inherited connection would carry the parent's pid: the child needs its own
    time.sleep(0.2)
    os._exit(0)
os.waitpid(child, 0)
print(child, flush=True)
time.sleep(0.3)
"""
    result = run_python(code, socket_path)
    child_pid = int(result.stdout.split()[0])
    wait_for(lambda: len(recorder.disconnects) == 2)
    parent_pid = recorder.events[0].pid
    assert [(e.pid, e.phase) for e in recorder.events] == [(parent_pid, "training"), (child_pid, "inference")]
    assert recorder.disconnects == [child_pid, parent_pid]  # the child's exit did not end the parent's registration


def test_concurrent_threads_keep_messages_whole(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    reg = client.register("w", "training")

    def toggle() -> None:
        for _ in range(300):
            with reg.phase("inference"):
                pass

    def all_threads() -> None:
        threads = [threading.Thread(target=toggle) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run_with_hang_guard(all_threads)
    # Scopes interleaved across threads end in some phase; the agent must end up agreeing with the client.
    wait_for(lambda: recorder.events and recorder.events[-1].phase == reg.current_phase)
    assert server.accepted > 8
    assert server.errors == 0  # no torn or interleaved lines


def test_oversized_labels_are_dropped_not_the_registration(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder
) -> None:
    client.register("w", labels={"big": "x" * (client.MAX_MESSAGE_BYTES + 10), "small": "y"})
    wait_for(lambda: recorder.events)
    assert dict(recorder.events[0].labels) == {}
    assert server.errors == 0


def test_bad_arguments_never_raise(
    fresh_client: client._Client, server: RegistrationServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    client.register("w", labels={"k": Unprintable()})  # type: ignore[dict-item]
    reg = client.register("  my model (v2)  ", phase="Evaluation", job=123)  # type: ignore[arg-type]
    with reg.phase("nonsense"):
        pass
    wait_for(lambda: len(recorder.events) >= 2)
    assert (recorder.events[-1].workload, recorder.events[-1].phase, recorder.events[-1].job) == (
        "my_model__v2_",
        "unknown",
        "123",
    )
    assert server.errors == 0
    assert any("Evaluation" in r.getMessage() for r in caplog.records)


# --- without an agent -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "directory", "refused", "too-long"])
def test_no_agent_logs_one_warning_and_never_raises(
    fresh_client: client._Client,
    socket_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    if kind == "directory":
        socket_path.mkdir()
    elif kind == "refused":
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(socket_path))
        dead.close()  # a socket file nobody listens on
    elif kind == "too-long":
        monkeypatch.setenv(client.ENV_SOCKET, "/" + "x" * 200)
    caplog.set_level(logging.WARNING, logger="wattmeter.client")

    def many_calls() -> None:
        for i in range(200):
            with client.register("w", "training") as reg, reg.phase("inference"):
                pass
            client.register(f"plain{i}")
            time.sleep(0.001)  # lets retries (every 0.05 s here) happen: they must stay silent too

    run_with_hang_guard(many_calls)
    assert len(unreachable_warnings(caplog)) == 1
    assert not fresh_client.connected
    assert client.dropped > 0


def test_permission_denied_logs_one_warning(server: RegistrationServer, socket_path: Path) -> None:
    # A separate process, which drops to nobody when we are root (root passes any mode check).
    os.chmod(socket_path, 0o000)
    code = """
import logging, os, sys
import collector.client as c
logging.basicConfig(level=logging.WARNING)
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
for _ in range(50):
    with c.register('w', 'training') as reg, reg.phase('inference'):
        pass
print('done', c.dropped)
"""
    result = run_python(code, socket_path)
    assert result.stdout.startswith("done")
    assert result.stderr.count("not reachable") == 1
    assert "Permission denied" in result.stderr
    assert server.accepted == 0


def test_retries_quietly_and_registers_once_the_agent_appears(
    fresh_client: client._Client, socket_path: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wattmeter.client")
    client.register("w", "training", "j")
    assert not fresh_client.connected
    server = RegistrationServer(socket_path, on_register=recorder.on_register)
    server.start()
    try:
        wait_for(lambda: recorder.events, timeout_s=GENEROUS_S)  # the watcher retries for a plain registration
        assert (recorder.events[0].workload, recorder.events[0].phase) == ("w", "training")
    finally:
        server.stop()
    assert len(unreachable_warnings(caplog)) == 1


def test_retries_are_spaced_by_the_retry_interval(
    monkeypatch: pytest.MonkeyPatch, socket_path: Path, recorder: Recorder
) -> None:
    state = client._Client(retry_interval_s=3600)
    monkeypatch.setattr(client, "_client", state)
    monkeypatch.setenv(client.ENV_SOCKET, str(socket_path))
    try:
        client.register("w")
        server = RegistrationServer(socket_path, on_register=recorder.on_register)
        server.start()
        try:
            with client.register("w") as reg:
                reg.phase("inference")
                assert not state.connected  # the next try is an hour away
            assert server.connections == 0
        finally:
            server.stop()
    finally:
        state.close()


# --- never blocking -------------------------------------------------------------------------------------


def test_sends_never_block_when_the_agent_does_not_read(fresh_client: client._Client, socket_path: Path) -> None:
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(socket_path))
    stuck.listen(1)  # never accepts, never reads: the client's socket buffer fills up
    try:

        def flood() -> None:
            reg = client.register("w", "training")
            for _ in range(20_000):
                with reg.phase("inference"):
                    pass

        run_with_hang_guard(flood)
        assert fresh_client.connected
        assert client.dropped > 0
    finally:
        stuck.close()


def test_dropped_phase_changes_are_resent_once_the_agent_reads(fresh_client: client._Client, socket_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(1)
    try:
        reg = client.register("w", "training")
        for _ in range(20_000):
            reg.phase("inference")
            reg.phase("training")
        reg.phase("inference")  # the last word
        assert client.dropped > 0
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(GENEROUS_S)
            received = b""

            def last_state() -> str | None:
                lines = [json.loads(line) for line in received.splitlines()]
                return lines[-1]["phase"] if lines else None

            deadline = time.monotonic() + GENEROUS_S
            while time.monotonic() < deadline:
                try:
                    conn.settimeout(0.5)
                    chunk = conn.recv(1 << 20)
                except TimeoutError:
                    if received.endswith(b"\n") and last_state() == "inference":
                        break
                    continue
                received += chunk
            assert received.endswith(b"\n")
            messages = [json.loads(line) for line in received.splitlines()]  # all whole lines
            assert messages[0] == {
                "v": 1,
                "type": "register",
                "workload": "w",
                "phase": "training",
                "job": "",
                "labels": {},
            }
            assert messages[-1]["phase"] == "inference"  # the last word arrived, sent or resent as a register
    finally:
        listener.close()


# --- what it drags into the host process ----------------------------------------------------------------


def test_importing_the_client_imports_only_the_standard_library(socket_path: Path) -> None:
    code = (
        "import sys, collector.client\n"
        "heavy = [m for m in ('pydantic', 'pydantic_settings', 'grpc', 'numpy', 'prometheus_client', 'pynvml', "
        "'psutil') if m in sys.modules]\n"
        "ours = sorted(m for m in sys.modules if m.startswith('collector'))\n"
        "print(heavy, ours)\n"
    )
    result = run_python(code, socket_path)
    assert result.stdout.strip() == "[] ['collector', 'collector.client']"
