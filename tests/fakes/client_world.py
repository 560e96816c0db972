"""The client tests' world: a real registration server on a Unix socket in tmp_path, a fresh client state,
and a recorder of what the server heard."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import collector.client as client
from collector.registration import RegistrationEvent, RegistrationServer, SpanEvent

REPO_ROOT = Path(__file__).resolve().parents[2]
GENEROUS_S = 60.0  # a hang guard, not a speed target


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


def run_with_hang_guard(target: Callable[[], None], timeout_s: float = GENEROUS_S) -> None:
    """Run ``target`` on a thread; fail (instead of hanging the suite) if it has not returned in ``timeout_s``."""
    failures: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"blocked for over {timeout_s} s"
    assert not failures, failures


class Recorder:
    def __init__(self) -> None:
        self.events: list[RegistrationEvent] = []
        self.spans: list[SpanEvent] = []
        self.disconnects: list[int] = []

    def on_register(self, event: RegistrationEvent) -> None:
        self.events.append(event)

    def on_span(self, event: SpanEvent) -> None:
        self.spans.append(event)

    def on_disconnect(self, pid: int) -> None:
        self.disconnects.append(pid)

    def phases(self) -> list[str]:
        return [event.phase for event in self.events]


def make_server(socket_path: Path, recorder: Recorder) -> RegistrationServer:
    return RegistrationServer(
        socket_path,
        max_messages_per_s=1e9,  # the rate limit has its own test; here every message should arrive
        on_register=recorder.on_register,
        on_disconnect=recorder.on_disconnect,
        on_span=recorder.on_span,
    )


def subprocess_env(socket_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WATTMETER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env[client.ENV_SOCKET] = str(socket_path)
    return env
