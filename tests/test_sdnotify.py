"""systemd notifications (collector/sdnotify.py) received on a real AF_UNIX datagram socket, as systemd's."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.sdnotify import LoopHeartbeat, Notifier, Watchdog, socket_address, watchdog_interval_s
from tests.fakes.ports import free_port
from tests.fakes.powercap import typical_server
from tests.fakes.waiting import wait_for


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket (a path, or an abstract name when ``abstract``)."""

    def __init__(self, directory: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"wattmeter-test-{os.getpid()}-{id(self)}"
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        else:
            path = directory / "notify.sock"
            self.sock.bind(str(path))
            self.env_value = str(path)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self.sock.settimeout(0.1)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode())

    def received(self) -> list[str]:
        with self._lock:
            return list(self.messages)

    def assignments(self) -> list[str]:
        """Every KEY=VALUE line received, in order."""
        return [line for message in self.received() for line in message.split("\n")]

    def count(self, line: str) -> int:
        return self.assignments().count(line)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(1.0)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # a socket path has at most 107 bytes; pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="wm-") as directory:
        yield Path(directory)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(short_dir, abstract=request.param == "abstract")
    yield receiver
    receiver.close()


def test_ready_status_stopping_reach_the_socket(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.env_value})
    assert notifier.enabled
    assert notifier.ready("sampling 2 GPUs")
    assert notifier.status("two\nlines")  # one STATUS line: a newline would be a second assignment
    assert notifier.watchdog()
    assert notifier.stopping()
    wait_for(lambda: len(notify_socket.received()) == 4)
    assert notify_socket.received() == [
        "READY=1\nSTATUS=sampling 2 GPUs",
        "STATUS=two lines",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_s is None  # no socket: no watchdog, even with WATCHDOG_USEC
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"}).watchdog_s is None


def test_a_socket_that_is_gone_never_raises(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(short_dir / "nobody-listens.sock")})
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    warnings = [r for r in caplog.records if "systemd notification" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not on every ping


def test_socket_addresses() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@/org/freedesktop/systemd1/notify/123") == b"\0/org/freedesktop/systemd1/notify/123"
    assert socket_address("") is None
    assert socket_address("@") is None
    assert socket_address("relative.sock") is None


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, 42) is None  # another's
    assert watchdog_interval_s({}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 42) is None


def test_watchdog_pings_only_while_alive(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "40000"})  # a ping per 20 ms
    assert notifier.watchdog_s == pytest.approx(0.02)
    alive = threading.Event()
    alive.set()
    checks = 0

    def check() -> bool:
        nonlocal checks
        checks += 1
        if checks == 3:
            raise RuntimeError("a broken check is no progress")
        return alive.is_set()

    watchdog = Watchdog(notifier, check)
    watchdog.start()
    try:
        wait_for(lambda: notify_socket.count("WATCHDOG=1") >= 5)
        alive.clear()
        stalled_at = checks
        wait_for(lambda: checks >= stalled_at + 2)  # a check after the stall sent nothing
        pings = notify_socket.count("WATCHDOG=1")
        wait_for(lambda: checks >= stalled_at + 10)
        assert notify_socket.count("WATCHDOG=1") <= pings + 1  # at most one sent before the stall and read late
        alive.set()
        wait_for(lambda: notify_socket.count("WATCHDOG=1") > pings)  # progress again: pings again
    finally:
        watchdog.stop()


def test_no_watchdog_thread_when_systemd_asks_for_none(notify_socket: NotifySocket) -> None:
    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": notify_socket.env_value}), lambda: True)
    watchdog.start()
    assert not any(thread.name == "sd-watchdog" for thread in threading.enumerate())
    watchdog.stop()


def test_loop_heartbeat_fails_while_the_loop_is_blocked() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        heartbeat = LoopHeartbeat(loop)
        assert heartbeat()  # first call
        wait_for(heartbeat)  # the loop ran the callback posted before
        release = threading.Event()
        loop.call_soon_threadsafe(release.wait)  # the loop blocks, as a synchronous call on it would
        wait_for(lambda: not heartbeat())
        assert not heartbeat()
        release.set()
        wait_for(heartbeat)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(2.0)
        loop.close()
    assert LoopHeartbeat(loop)() is False  # a closed loop: dead, and no exception


# The real services as processes, told where systemd listens the way systemd tells them: by the environment.

REPO = Path(__file__).resolve().parents[1]
PING_USEC = 400_000  # WatchdogSec=0.4 s: a ping every 0.2 s


def start_service(args: list[str], notify: NotifySocket, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATTMETER_", "NOTIFY_", "WATCHDOG_"))}
    env |= {"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": str(PING_USEC)}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "collector", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def agent_config(path: Path, rapl_root: Path, api_socket: Path, read_timeout_s: float = 2.0) -> str:
    """Writes the agent's config to ``path``; returns its metrics address."""
    listen = f"127.0.0.1:{free_port()}"
    path.write_text(
        f"""
[prometheus]
listen = "{listen}"

[sources.nvml]
enabled = false

[sources.rapl]
root = "{rapl_root}"

[sampler]
read_timeout_s = {read_timeout_s}

[api]
socket = "{api_socket}"
"""
    )
    return listen


def ready_line(notify: NotifySocket) -> str:
    return next(message for message in notify.received() if message.startswith("READY=1"))


def test_agent_notifies_ready_pings_and_stopping(tmp_path: Path, short_dir: Path) -> None:
    rapl = typical_server(tmp_path / "root", packages=2)
    config = tmp_path / "agent.toml"
    listen = agent_config(config, rapl.class_dir, short_dir / "agent.sock")
    notify = NotifySocket(short_dir)
    log_path = tmp_path / "agent.log"
    agent = start_service(["agent", "--config", str(config), "--simulate-gpus", "2"], notify, log_path)
    try:
        wait_for(lambda: notify.count("WATCHDOG=1") >= 3, timeout_s=30)
        assert notify.assignments()[0] == "READY=1"  # ready before the first ping
        rapl_domains = len(rapl.zones)
        assert ready_line(notify) == (
            f"READY=1\nSTATUS=sampling 0 GPUs, 2 simulated GPUs, {rapl_domains} RAPL domains; metrics on {listen}"
        )
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0, log_path.read_text()
        wait_for(lambda: notify.count("STOPPING=1") == 1)
        assert notify.assignments()[-2:] == ["STOPPING=1", "STATUS=stopping"]
    finally:
        stop(agent)
        notify.close()


def test_agent_pings_stop_while_the_sampler_is_stuck_in_a_read(tmp_path: Path, short_dir: Path) -> None:
    """RAPL alone, then every energy_uj gone (reads fail: still progress), then a FIFO in its place: opening it
    blocks, as a read hung in a driver does, and the pings stop."""
    rapl = typical_server(tmp_path / "root", packages=1)
    config = tmp_path / "agent.toml"
    agent_config(config, rapl.class_dir, short_dir / "agent.sock", read_timeout_s=0.5)
    notify = NotifySocket(short_dir)
    log_path = tmp_path / "agent.log"
    agent = start_service(["agent", "--config", str(config)], notify, log_path)
    energy_files = [zone.path / "energy_uj" for zone in rapl.zones.values()]
    try:
        wait_for(lambda: notify.count("WATCHDOG=1") >= 2, timeout_s=30)
        for energy in energy_files:
            energy.unlink()
        wait_for(lambda: any("failing: rapl" in line for line in notify.assignments()), timeout_s=10)
        pings = notify.count("WATCHDOG=1")
        wait_for(lambda: notify.count("WATCHDOG=1") >= pings + 2)  # failing reads are progress: still pinged
        for energy in energy_files:
            os.mkfifo(energy)
        wait_for(lambda: "hung driver" in log_path.read_text(), timeout_s=10)
        stalled = notify.count("WATCHDOG=1")
        time.sleep(10 * PING_USEC / 2e6)  # ten ping intervals: at most the one ping already in flight
        assert notify.count("WATCHDOG=1") <= stalled + 1
        assert "systemd's watchdog is no longer pinged" in log_path.read_text()
        agent.send_signal(signal.SIGTERM)  # the hung read does not hold up the exit
        assert agent.wait(10) == 0, log_path.read_text()
        wait_for(lambda: notify.count("STOPPING=1") == 1)
    finally:
        stop(agent)
        notify.close()


def test_aggregator_notifies_ready_pings_and_stopping(tmp_path: Path, short_dir: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f"""
[grpc]
listen = "127.0.0.1:{grpc_port}"

[http]
listen = "127.0.0.1:{http_port}"

[storage]
url = "sqlite:///{tmp_path / "aggregator.db"}"

[ingest]
workers = 0
"""
    )
    notify = NotifySocket(short_dir)
    log_path = tmp_path / "aggregator.log"
    aggregator = start_service(["aggregator", "--config", str(config)], notify, log_path)
    try:
        wait_for(lambda: notify.count("WATCHDOG=1") >= 3, timeout_s=30)
        assert notify.assignments()[0] == "READY=1"
        assert ready_line(notify) == (
            f"READY=1\nSTATUS=gRPC on 127.0.0.1:{grpc_port}, HTTP on 127.0.0.1:{http_port}, "
            f"storage sqlite:///{tmp_path / 'aggregator.db'}"
        )
        with socket.create_connection(("127.0.0.1", http_port), timeout=2):  # READY means both listen already
            pass
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=2):
            pass
        aggregator.send_signal(signal.SIGTERM)
        assert aggregator.wait(10) == 0, log_path.read_text()
        wait_for(lambda: notify.count("STOPPING=1") == 1)
    finally:
        stop(aggregator)
        notify.close()
