"""The client tests' world: a real registration server on a Unix socket in tmp_path, a fresh client state,
and a recorder of what the server heard."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import collector.client as client
from collector.registration import RegistrationServer
from tests.fakes.registration_world import Recorder

REPO_ROOT = Path(__file__).resolve().parents[2]
GENEROUS_S = 60.0  # a hang guard, not a speed target


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


def run_python(code: str, socket_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter whose client talks to ``socket_path``; it must exit 0."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(socket_path),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=GENEROUS_S,
    )
    assert result.returncode == 0, result.stderr
    return result
