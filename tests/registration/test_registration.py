"""The registration server over a real Unix socket in tmp_path: credentials from SO_PEERCRED, bounds, bad input."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from collector.config import ApiConfig
from collector.errors import RegistrationSocketError
from collector.registration import RegistrationEvent, RegistrationServer
from tests.fakes.registration_world import Recorder, connect, line
from tests.fakes.waiting import wait_for


def register_line(workload: str = "w", phase: str = "training", job: str = "j", **extra: object) -> bytes:
    return line({"v": 1, "type": "register", "workload": workload, "phase": phase, "job": job, **extra})


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def assert_serves_good_client(server: RegistrationServer, recorder: Recorder, workload: str = "good") -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(register_line(workload))
        wait_for(lambda: any(e.workload == workload for e in recorder.events))


# --- events -----------------------------------------------------------------------------------------------


def test_register_event_takes_pid_uid_gid_from_the_socket_not_the_message(
    server: RegistrationServer, recorder: Recorder
) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(register_line("llama", "inference", "job-1", labels={"team": "a"}, pid=1, uid=1234))
        wait_for(lambda: recorder.events)
    event = recorder.events[0]
    assert event == RegistrationEvent(
        pid=os.getpid(),
        uid=os.getuid(),
        gid=os.getgid(),
        workload="llama",
        phase="inference",
        job="job-1",
        labels={"team": "a"},
        kind="register",
    )
    assert server.accepted == 1
    assert server.errors == 0


def test_defaults_and_trimming(server: RegistrationServer, recorder: Recorder) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(line({"v": 1, "type": "register", "workload": "  vllm/serve:v1.2_a-b  "}))
        wait_for(lambda: recorder.events)
    event = recorder.events[0]
    assert (event.workload, event.phase, event.job, dict(event.labels)) == ("vllm/serve:v1.2_a-b", "unknown", "", {})


def test_phase_message_changes_only_the_phase(server: RegistrationServer, recorder: Recorder) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(register_line("w", "training", "j", labels={"k": "v"}))
        sock.sendall(line({"v": 1, "type": "phase", "phase": "inference"}))
        wait_for(lambda: len(recorder.events) == 2)
    change = recorder.events[1]
    assert (change.kind, change.workload, change.phase, change.job, dict(change.labels)) == (
        "phase",
        "w",
        "inference",
        "j",
        {"k": "v"},
    )


def test_several_messages_in_one_write_and_one_message_in_pieces(
    server: RegistrationServer, recorder: Recorder
) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(register_line("a") + register_line("b") + b"\n\n")
        data = register_line("c")
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
        wait_for(lambda: len(recorder.events) == 3)
    assert [e.workload for e in recorder.events] == ["a", "b", "c"]
    assert server.errors == 0


def test_disconnect_event_for_registered_connections_only(server: RegistrationServer, recorder: Recorder) -> None:
    silent = connect(server.socket_path)
    registered = connect(server.socket_path)
    registered.sendall(register_line())
    wait_for(lambda: recorder.events)
    silent.close()
    registered.close()
    # the connection count drops before the disconnect callback runs: wait for both
    wait_for(lambda: server.connections == 0 and recorder.disconnects)
    assert recorder.disconnects == [os.getpid()]


def test_many_clients_at_once(server: RegistrationServer, recorder: Recorder) -> None:
    socks = [connect(server.socket_path) for _ in range(50)]
    for i, sock in enumerate(socks):
        sock.sendall(register_line(f"w{i}"))
    wait_for(lambda: len(recorder.events) == 50)
    assert server.connections == 50
    for sock in socks:
        sock.close()
    wait_for(lambda: len(recorder.disconnects) == 50)


# --- refused input: counted, the server stays up --------------------------------------------------------

REFUSED = [
    pytest.param(b"\x00\xff\xfe\x80 not json at all\n", "garbage", False, id="garbage-bytes"),
    pytest.param(b'{"v": 1, "type": "register", "workload": \n', "garbage", False, id="invalid-json"),
    pytest.param(b"[1, 2, 3]\n", "garbage", False, id="not-an-object"),
    pytest.param(b"[" * 60000 + b"\n", "garbage", False, id="deep-nesting"),
    pytest.param(line({"type": "register", "workload": "w"}), "garbage", False, id="no-version"),
    pytest.param(line({"v": "1", "type": "register", "workload": "w"}), "garbage", False, id="string-version"),
    pytest.param(line({"v": True, "type": "register", "workload": "w"}), "garbage", False, id="bool-version"),
    pytest.param(line({"v": 2, "type": "register", "workload": "w"}), "version", True, id="newer-version"),
    pytest.param(line({"v": 0, "type": "register", "workload": "w"}), "version", True, id="older-version"),
    pytest.param(line({"v": 1, "type": "subscribe"}), "unknown_type", False, id="unknown-type"),
    pytest.param(line({"v": 1, "type": "phase", "phase": "training"}), "not_registered", False, id="phase-first"),
    pytest.param(register_line(phase="evaluation"), "phase", False, id="invalid-phase"),
    pytest.param(register_line(phase=None), "phase", False, id="null-phase"),  # type: ignore[arg-type]
    pytest.param(register_line(workload="has space"), "workload", False, id="workload-chars"),
    pytest.param(register_line(workload="x" * 129), "workload", False, id="workload-long"),
    pytest.param(register_line(workload="   "), "workload", False, id="workload-empty"),
    pytest.param(line({"v": 1, "type": "register"}), "workload", False, id="workload-missing"),
    pytest.param(register_line(workload=7), "workload", False, id="workload-number"),  # type: ignore[arg-type]
    pytest.param(register_line(labels={"k": 1}), "field", False, id="label-not-string"),
    pytest.param(register_line(labels=["k"]), "field", False, id="labels-not-object"),
    pytest.param(register_line(job="j" * 257), "field", False, id="job-long"),
    pytest.param(register_line(labels={f"k{n}": "v" for n in range(17)}), "field", False, id="labels-too-many"),
    pytest.param(register_line(labels={"team name": "a"}), "field", False, id="label-name-not-a-label"),
    pytest.param(register_line(labels={"team": "v" * 257}), "field", False, id="label-value-long"),
]


@pytest.mark.parametrize(("data", "reason", "closes"), REFUSED)
def test_refused_input_is_counted_and_the_server_keeps_serving(
    server: RegistrationServer, recorder: Recorder, data: bytes, reason: str, closes: bool
) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(data)
        if closes:
            assert closed_by_server(sock)
        else:
            sock.sendall(register_line("same-connection"))  # the connection is still usable
            wait_for(lambda: recorder.events)
            assert recorder.events[0].workload == "same-connection"
    wait_for(lambda: server.errors == 1)
    assert server.error_counts[reason] == 1
    assert_serves_good_client(server, recorder)


@pytest.mark.parametrize("newline", [True, False], ids=["long-line", "endless-line"])
def test_oversize_line_closes_the_connection(
    make_server: Callable[..., RegistrationServer], recorder: Recorder, newline: bool
) -> None:
    server = make_server(max_message_bytes=256)
    with connect(server.socket_path) as sock:
        sock.sendall(register_line("fits"))
        sock.sendall(b'{"v": 1, "type": "register", "workload": "' + b"x" * 300 + (b'"}\n' if newline else b""))
        assert closed_by_server(sock)
    assert server.error_counts["oversize"] == 1
    assert [e.workload for e in recorder.events] == ["fits"]
    wait_for(lambda: recorder.disconnects == [os.getpid()])
    assert_serves_good_client(server, recorder)


def test_a_line_of_exactly_the_limit_is_accepted(
    make_server: Callable[..., RegistrationServer], recorder: Recorder
) -> None:
    server = make_server(max_message_bytes=256)
    data = register_line("w", labels={"pad": ""})
    data = data.replace(b'"pad": ""', b'"pad": "' + b"p" * (256 - len(data) + 1) + b'"')
    assert len(data) == 257  # 256 bytes and the newline
    with connect(server.socket_path) as sock:
        sock.sendall(data)
        wait_for(lambda: recorder.events)
    assert server.errors == 0


def test_flooding_beyond_the_rate_is_dropped_and_counted(
    make_server: Callable[..., RegistrationServer], recorder: Recorder
) -> None:
    server = make_server(max_messages_per_s=5.0)
    flood = 200
    with connect(server.socket_path) as sock:
        sock.sendall(register_line() + line({"v": 1, "type": "phase", "phase": "inference"}) * flood)
        wait_for(lambda: server.accepted + server.error_counts["rate_limited"] == flood + 1)
    # The burst is one second's worth (5), plus whatever refilled while the lines were read: far below the flood.
    assert server.accepted < flood // 2
    assert server.error_counts["rate_limited"] > flood // 2
    assert server.errors == server.error_counts["rate_limited"]
    assert_serves_good_client(server, recorder)  # another connection has its own bucket


def test_connections_beyond_the_limit_are_closed_and_counted(
    make_server: Callable[..., RegistrationServer], recorder: Recorder
) -> None:
    server = make_server(max_connections=2)
    first, second = connect(server.socket_path), connect(server.socket_path)
    wait_for(lambda: server.connections == 2)
    with connect(server.socket_path) as third:
        assert closed_by_server(third)
    assert server.error_counts["connection_limit"] == 1
    first.close()
    wait_for(lambda: server.connections == 1)
    assert_serves_good_client(server, recorder)
    second.close()


def test_a_failing_callback_is_counted_and_the_server_keeps_serving(
    make_server: Callable[..., RegistrationServer], recorder: Recorder
) -> None:
    def explode(event: RegistrationEvent) -> None:
        recorder.events.append(event)
        if event.workload == "boom":
            raise RuntimeError("callback bug")

    server = make_server(on_register=explode)
    with connect(server.socket_path) as sock:
        sock.sendall(register_line("boom"))
        wait_for(lambda: server.callback_errors == 1)
    assert_serves_good_client(server, recorder)


# --- the socket file --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_socket_file_gets_the_configured_mode(make_server: Callable[..., RegistrationServer], mode: int) -> None:
    server = make_server(mode=mode)
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_from_config(socket_path: Path, recorder: Recorder) -> None:
    api = ApiConfig(socket=socket_path, socket_mode=0o600, max_message_bytes=1024, max_messages_per_s=50)
    server = RegistrationServer.from_config(api, on_register=recorder.on_register)
    assert (server.socket_path, server.mode, server.max_message_bytes, server.max_messages_per_s) == (
        socket_path,
        0o600,
        1024,
        50,
    )


def test_stop_removes_the_socket_file_and_closes_connections_without_events(
    server: RegistrationServer, recorder: Recorder
) -> None:
    with connect(server.socket_path) as sock:
        sock.sendall(register_line())
        wait_for(lambda: recorder.events)
        server.stop()
        assert closed_by_server(sock)
    assert not server.socket_path.exists()
    assert recorder.disconnects == []


def test_a_stale_socket_file_is_replaced(socket_path: Path, make_server: Callable[..., RegistrationServer]) -> None:
    socket_path.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(socket_path))
    dead.close()  # the file stays, nobody listens: what a killed agent leaves
    server = make_server()
    with connect(server.socket_path):
        wait_for(lambda: server.connections == 1)


def test_a_live_agent_socket_is_not_taken_over(
    server: RegistrationServer, socket_path: Path, recorder: Recorder
) -> None:
    second = RegistrationServer(socket_path, on_register=recorder.on_register)
    with pytest.raises(RegistrationSocketError, match="already listening"):
        second.start()
    assert_serves_good_client(server, recorder)


def test_a_path_that_is_not_a_socket_is_left_alone(socket_path: Path, recorder: Recorder) -> None:
    socket_path.parent.mkdir(parents=True)
    socket_path.write_text("precious")
    with pytest.raises(RegistrationSocketError, match="not a socket"):
        RegistrationServer(socket_path, on_register=recorder.on_register).start()
    assert socket_path.read_text() == "precious"


def test_stop_leaves_a_newer_agents_socket(make_server: Callable[..., RegistrationServer], socket_path: Path) -> None:
    old = make_server()
    socket_path.unlink()  # e.g. an operator cleaning up; a new agent then starts on the same path
    new = make_server()
    old.stop()
    assert socket_path.exists()
    with connect(socket_path):
        wait_for(lambda: new.connections == 1)


def test_stop_returns_when_a_callback_is_slow(make_server: Callable[..., RegistrationServer]) -> None:
    release = threading.Event()
    server = make_server(on_register=lambda event: release.wait(10))
    with connect(server.socket_path) as sock:
        sock.sendall(register_line())
        wait_for(lambda: server.accepted == 1)
        server.stop(timeout_s=0.1)  # logs that the thread is stuck, but returns
        release.set()
    assert not server.socket_path.exists()
