"""systemd's notify protocol (sd_notify(3)): datagrams of ``KEY=VALUE`` lines to the socket in ``$NOTIFY_SOCKET``.

Standard library only. Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing, and nothing here raises
into the service: a notification that cannot be sent is logged once and dropped, as libsystemd's own
``sd_notify`` returns an error that daemons ignore.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes | None:
    """The address in ``NOTIFY_SOCKET``: a path, or an abstract name for a leading ``@`` (a NUL on the wire, as
    sd_notify(3) says). None for anything else (``vsock:`` addresses, relative paths), which is not ours to use."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises; None
    when no watchdog is asked for, or it is asked of another process (``WATCHDOG_PID``)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(pid):
        return None
    return usec / 2e6


class Notifier:
    """Sends notifications to systemd; every method is a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = socket_address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = watchdog_interval_s(environ, os.getpid()) if self.address is not None else None
        self._failed = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            with self._lock:
                first, self._failed = not self._failed, True
            if first:
                log.warning("systemd notification to %s failed: %s (later failures are not logged)", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *_status(status))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def status(self, status: str) -> bool:
        return self.notify(*_status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


def _status(text: str) -> tuple[str, ...]:
    # one line: a newline would start another KEY=VALUE assignment
    return (f"STATUS={' '.join(text.split())}",) if text else ()


class Watchdog:
    """A thread that sends ``WATCHDOG=1`` every ``notifier.watchdog_s`` while ``alive()`` says the service works.

    ``alive`` is asked once per interval; a service that stalls stops the pings and systemd restarts it after
    ``WatchdogSec``. Does nothing when systemd asked for no watchdog.
    """

    def __init__(self, notifier: Notifier, alive: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.alive = alive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.notifier.watchdog_s is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval_s = self.notifier.watchdog_s
        assert interval_s is not None
        stalled = False
        while not self._stop.wait(interval_s):
            try:
                alive = self.alive()
            except Exception:  # a check that breaks counts as no progress, never ends the thread
                log.exception("watchdog liveness check failed")
                alive = False
            if alive:
                self.notifier.watchdog()
            elif not stalled:
                log.error("no progress since the last watchdog ping: systemd's watchdog is no longer pinged")
            stalled = not alive

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None


class LoopHeartbeat:
    """Liveness of an asyncio event loop, asked from another thread: each call posts a callback to the loop and
    answers whether the one posted by the previous call has run (the first call: True). A loop blocked or gone
    answers False from its second call on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._beat = threading.Event()
        self._beat.set()

    def __call__(self) -> bool:
        beat = self._beat.is_set()
        if beat:
            self._beat.clear()
            try:
                self.loop.call_soon_threadsafe(self._beat.set)
            except RuntimeError:  # the loop is closed
                return False
        return beat
