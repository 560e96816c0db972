"""The demo's child processes: started in their own process group (a Ctrl-C in the terminal reaches only the demo,
which stops them in order), told to die with the demo (Linux ``PR_SET_PDEATHSIG``), logged to a file each."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOG_TAIL_LINES = 12


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo dies, however it dies (not inherited past exec of setuid)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One child process: ``python -m MODULE ARGS``, stdout and stderr into ``log_path``."""

    def __init__(self, name: str, module: str, args: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        """None while it runs."""
        return self.process.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns its exit code (None if it could not be waited)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
        try:
            return self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            return None


class ChildDied(Exception):
    def __init__(self, child: Child, code: int) -> None:
        super().__init__(f"{child.name} exited with code {code}")
        self.child = child
        self.code = code


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status) == 200
    except (OSError, urllib.error.HTTPError):
        return False


def wait_until(child: Child, ready: Callable[[], bool], timeout_s: float, stopping: Callable[[], bool]) -> bool:
    """Poll ``ready`` until it holds (True), the demo is told to stop (False) or ``timeout_s`` passes (TimeoutError);
    ChildDied when the child exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = child.exit_code()
        if code is not None:
            raise ChildDied(child, code)
        if ready():
            return True
        if stopping():
            return False
        time.sleep(0.1)
    raise TimeoutError(f"{child.name} was not ready within {timeout_s:.0f} s")


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without ``WATTMETER_*`` (the demo's config files say everything), plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WATTMETER_")}
    env.update(extra)
    return env
