"""Tell the local Wattmeter agent which workload this process is, so its GPU and CPU energy is attributed to it.

Use it from inference servers and training jobs::

    import collector.client

    with collector.client.register("llama-70b", phase="training", job="run-42") as reg:
        train()
        with reg.phase("inference"):  # evaluation; the previous phase comes back on exit
            evaluate()

or as a plain call, which stays in force until the process exits (or ``close()``)::

    collector.client.register("llama-70b-serve", phase="inference")

This module runs inside other people's processes, so it imports only the standard library (nothing from
``collector``), never blocks the caller and never raises into it:

- With no agent (no socket, connection refused, permission denied) it logs ONE warning on the
  ``wattmeter.client`` logger and carries on silently; later calls retry connecting at most every
  ``RETRY_INTERVAL_S`` seconds, without logging again.
- Sends are non-blocking (``MSG_DONTWAIT`` on a non-blocking socket). When the socket buffer is full the message is
  dropped and counted in the module-level ``dropped``; the full state is re-sent once the socket drains, so the
  agent ends up with the latest phase even when some changes were dropped.
- A daemon thread (``wattmeter-client``, one per process, running only while something is registered) notices when
  the agent goes away, reconnects and registers again, so an agent restart loses nothing.
- One lock guards the socket; it is held only around non-blocking system calls.

One process is one workload at a time: ``register()`` replaces the process's registration. Leaving a
``with register(...)`` block restores the registration made before it, or, if there was none, closes the
connection so that the agent sees the process stop being that workload.

Wire protocol, version 1
------------------------
A ``SOCK_STREAM`` Unix socket, ``$WATTMETER_SOCKET`` or ``/run/wattmeter/agent.sock``. The client writes
newline-delimited JSON objects (UTF-8, one per line, at most 65536 bytes per line not counting the newline); the
agent writes nothing back. Every message carries the protocol's major version ``v`` and a ``type``::

    {"v": 1, "type": "register", "workload": "llama-70b", "phase": "training", "job": "run-42", "labels": {"team": "a"}}
    {"v": 1, "type": "phase", "phase": "inference"}

- ``register`` sets everything the agent knows about the connection's process; ``phase`` changes only the phase and
  is ignored before a ``register``. Sending ``register`` again is always allowed (the client re-sends it after a
  reconnect or after dropped messages).
- ``workload``: 1-128 characters of ``[A-Za-z0-9._:/-]`` after trimming. ``phase``: ``training``, ``inference`` or
  ``unknown`` (default ``unknown``). ``job``: at most 256 characters (default empty). ``labels``: an object of
  string values (default empty).
- The pid is not in the message: the agent takes pid, uid and gid from the socket (``SO_PEERCRED``), so a process
  can only speak for itself. Closing the connection (or exiting) ends the registration.
- Within a major version, fields are only ever added; the agent ignores fields it does not know. A message with an
  unknown ``type`` is ignored; one with a ``v`` the agent does not support gets the connection closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType

__all__ = [
    "DEFAULT_SOCKET",
    "ENV_SOCKET",
    "MAX_MESSAGE_BYTES",
    "PHASES",
    "PROTOCOL_VERSION",
    "RETRY_INTERVAL_S",
    "Registration",
    "close",
    "dropped",
    "register",
]

DEFAULT_SOCKET = "/run/wattmeter/agent.sock"
ENV_SOCKET = "WATTMETER_SOCKET"
PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 65536
"""The longest line the agent accepts, in bytes, not counting the newline."""
RETRY_INTERVAL_S = 5.0
"""Seconds between attempts to reach an agent that is not there."""
PHASES = ("training", "inference", "unknown")
MAX_WORKLOAD_CHARS = 128
MAX_JOB_CHARS = 256

dropped = 0
"""Messages not handed to the socket (no agent, socket buffer full, connection broken), since the process started."""

log = logging.getLogger("wattmeter.client")

_NOT_WORKLOAD_CHAR = re.compile(r"[^A-Za-z0-9._:/-]")
_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)  # no SIGPIPE in their process
_POLL_S = 1.0  # how often the watcher thread looks at the connection when nothing happens


def _count_drop() -> None:
    global dropped
    dropped += 1


class Registration:
    """What ``register()`` returns: a context manager that ends the registration on exit."""

    def __init__(self, client: _Client, workload: str, phase: str, job: str, labels: dict[str, str]) -> None:
        self._client = client
        self.workload = workload
        self.job = job
        self.labels = labels
        self._phase = phase
        self._entered = False

    @property
    def current_phase(self) -> str:
        return self._phase

    def phase(self, name: str) -> _PhaseChange:
        """Switch to phase ``name`` now; used as a context manager, the previous phase comes back on exit."""
        return _PhaseChange(self, name)

    def close(self) -> None:
        """End this registration (what leaving the ``with`` block does). Never raises."""
        try:
            self._client.remove(self)
        except Exception:  # never into the caller's code
            log.debug("wattmeter client: close failed", exc_info=True)

    def __enter__(self) -> Registration:
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registration(workload={self.workload!r}, phase={self._phase!r}, job={self.job!r})"


class _PhaseChange:
    """Applied when created, so ``reg.phase("inference")`` also works as a plain call; ``__exit__`` restores."""

    def __init__(self, registration: Registration, name: str) -> None:
        self._registration = registration
        self._previous = registration.current_phase
        try:
            registration._client.set_phase(registration, _clean_phase(name))
        except Exception:
            log.debug("wattmeter client: phase change failed", exc_info=True)

    def __enter__(self) -> _PhaseChange:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._registration._client.set_phase(self._registration, self._previous)
        except Exception:
            log.debug("wattmeter client: phase restore failed", exc_info=True)


class _Client:
    """The process's one connection to the agent and its stack of registrations; every field is under ``_lock``."""

    def __init__(self, retry_interval_s: float | None = None) -> None:
        self.retry_interval_s = RETRY_INTERVAL_S if retry_interval_s is None else retry_interval_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pending = b""  # the unsent tail of a partly sent message: sent before anything else, or framing breaks
        self._resync = False  # something was dropped: the next send is the full register message
        self._next_attempt = 0.0
        self._warned = False
        self._stack: list[Registration] = []
        self._watcher: threading.Thread | None = None
        self._warned_once: set[str] = set()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._sock is not None

    # --- called by the public API -------------------------------------------------------------------------

    def add(self, registration: Registration) -> None:
        with self._lock:
            # Plain calls are never exited: of consecutive ones only the newest matters, so repeated register()
            # calls keep the stack short. The newest is kept whatever it is: it may be about to be entered.
            kept: list[Registration] = []
            for i, entry in enumerate(self._stack):
                superseded = not entry._entered and i + 1 < len(self._stack) and not self._stack[i + 1]._entered
                if not superseded:
                    kept.append(entry)
            self._stack = [*kept, registration]
            warning = self._send_locked(full=True)
        self._log_unreachable(warning)

    def remove(self, registration: Registration) -> None:
        warning = None
        with self._lock:
            if registration not in self._stack:
                return
            was_current = self._stack[-1] is registration
            self._stack.remove(registration)
            if not self._stack:
                self._disconnect_locked()
            elif was_current:
                warning = self._send_locked(full=True)
        self._log_unreachable(warning)

    def set_phase(self, registration: Registration, phase: str) -> None:
        warning = None
        with self._lock:
            changed = registration._phase != phase
            registration._phase = phase
            if changed and self._stack and self._stack[-1] is registration:
                warning = self._send_locked(full=False)
        self._log_unreachable(warning)

    def close(self) -> None:
        with self._lock:
            self._stack.clear()
            self._disconnect_locked()

    def reset_after_fork(self) -> None:
        """In a forked child: the inherited connection speaks for the parent's pid (SO_PEERCRED is taken at
        connect time), and the lock may have been held by a thread that does not exist here."""
        self._lock = threading.Lock()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()  # our copy only: the parent's connection stays open
        self._sock = None
        self._pending = b""
        self._resync = False
        self._next_attempt = 0.0
        self._watcher = None

    def warn_once(self, key: str, message: str, *args: object) -> None:
        if key in self._warned_once:
            return
        self._warned_once.add(key)
        log.warning(message, *args)

    # --- the connection, always under the lock --------------------------------------------------------------

    def _send_locked(self, full: bool, retry: bool = False) -> str | None:
        """Send the current state (``full``) or just its phase. Returns the warning to log (outside the lock).

        ``retry``: the watcher reconnecting on its own, which is no message of the caller's to count as dropped.
        """
        if not self._stack:
            return None
        warning = None
        self._ensure_watcher_locked()  # also when no agent is there: the watcher keeps retrying
        if self._sock is None:
            warning = self._connect_locked()
            if self._sock is None:
                if not retry:
                    _count_drop()
                return warning
        current = self._stack[-1]
        if full or self._resync:
            data = self._register_message(current)
        else:
            data = _encode({"v": PROTOCOL_VERSION, "type": "phase", "phase": current._phase})
        if self._write_locked(data):
            self._resync = False
        else:
            _count_drop()
            self._resync = True
        return warning

    def _connect_locked(self) -> str | None:
        now = time.monotonic()
        if now < self._next_attempt:
            return None
        self._next_attempt = now + self.retry_interval_s
        path = os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            return self._unreachable_warning(path, exc)
        try:
            sock.setblocking(False)
            # A Unix stream connect never waits: it succeeds, or fails with EAGAIN when the agent's backlog is full.
            sock.connect(path)
        except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
            sock.close()
            return self._unreachable_warning(path, exc)
        self._sock = sock
        self._pending = b""
        self._resync = True  # a new connection knows nothing: the next message is the full register
        return None

    def _unreachable_warning(self, path: str, exc: BaseException) -> str | None:
        if self._warned:
            return None
        self._warned = True
        return (
            f"wattmeter agent not reachable at {path} ({exc}); energy is not attributed to this workload until it "
            f"is (retrying every {self.retry_interval_s:g} s; set {ENV_SOCKET} for another path). "
            "This warning is not repeated."
        )

    def _write_locked(self, data: bytes) -> bool:
        """Queue ``data`` on the socket without waiting; False if it was dropped (buffer full or connection gone)."""
        sock = self._sock
        assert sock is not None
        try:
            if self._pending:
                sent = sock.send(self._pending, _SEND_FLAGS)
                self._pending = self._pending[sent:]
                if self._pending:
                    return False
            sent = sock.send(data, _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # EPIPE, ECONNRESET: the agent went away; the watcher or the next call reconnects
            self._disconnect_locked()
            self._next_attempt = 0.0
            return False
        self._pending = data[sent:]
        return True

    def _flush_locked(self) -> None:
        """Called by the watcher when the socket is writable: finish a partial message, then resend the state."""
        if self._sock is None:
            return
        if self._pending:
            self._write_locked(b"")
        if (
            self._resync
            and not self._pending
            and self._sock is not None
            and self._stack
            and self._write_locked(self._register_message(self._stack[-1]))
        ):
            self._resync = False

    def _disconnect_locked(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                # close() alone would wait for the watcher's poll() on this socket to return before the agent saw
                # the end (poll holds the file open); shutdown() ends the connection now and wakes the poll.
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._pending = b""
        self._resync = False

    def _register_message(self, registration: Registration) -> bytes:
        message: dict[str, object] = {
            "v": PROTOCOL_VERSION,
            "type": "register",
            "workload": registration.workload,
            "phase": registration._phase,
            "job": registration.job,
            "labels": registration.labels,
        }
        return _encode(message)

    # --- the watcher thread ---------------------------------------------------------------------------------

    def _ensure_watcher_locked(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return
        watcher = threading.Thread(target=self._watch, name="wattmeter-client", daemon=True)
        self._watcher = watcher
        try:
            watcher.start()
        except RuntimeError:  # interpreter shutting down: nothing to watch for
            self._watcher = None

    def _watch(self) -> None:
        """Notice the agent going away, reconnect and register again, and resend state dropped on a full buffer."""
        try:
            while self._watch_once():
                pass
        except Exception:  # a bug here must never surface in the host process
            log.debug("wattmeter client: watcher stopped", exc_info=True)
        finally:
            with self._lock:
                if self._watcher is threading.current_thread():
                    self._watcher = None

    def _watch_once(self) -> bool:
        warning = None
        wait_s = 0.0
        with self._lock:
            if not self._stack:
                # Give up the watcher role under the lock, so a register() from now on starts a new watcher
                # rather than relying on this exiting one.
                if self._watcher is threading.current_thread():
                    self._watcher = None
                return False
            sock = self._sock
            wants_write = bool(self._pending) or self._resync
            if sock is None:
                wait_s = self._next_attempt - time.monotonic()
                if wait_s <= 0:
                    warning = self._send_locked(full=True, retry=True)
        self._log_unreachable(warning)
        if sock is None:
            if wait_s > 0:
                time.sleep(min(wait_s, _POLL_S))
            return True
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | (select.POLLOUT if wants_write else 0))
            events = poller.poll(_POLL_S * 1000)
        except (OSError, ValueError):  # closed by another thread meanwhile: look again
            return True
        for _, mask in events:
            with self._lock:
                if self._sock is not sock:
                    break
                if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._on_readable_locked(sock)
                if self._sock is sock and mask & select.POLLOUT:
                    self._flush_locked()
            if wants_write:
                time.sleep(0.01)  # writable but a send made no progress must not spin
        return True

    def _on_readable_locked(self, sock: socket.socket) -> None:
        """The agent sends nothing: readable means it closed the connection (restart), or a future reply."""
        try:
            data = sock.recv(4096, getattr(socket, "MSG_DONTWAIT", 0))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect_locked()
            self._next_attempt = 0.0  # an agent restart: try at once, then every retry interval

    def _log_unreachable(self, warning: str | None) -> None:
        if warning is not None:
            log.warning("%s", warning)


def _encode(message: Mapping[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def _clean_phase(phase: object) -> str:
    text = str(phase).strip().lower()
    if text in PHASES:
        return text
    _client.warn_once(f"phase:{text}", "wattmeter: phase %r is not one of %s; using 'unknown'", phase, PHASES)
    return "unknown"


def _clean_workload(workload: object) -> str:
    text = str(workload).strip()
    cleaned = _NOT_WORKLOAD_CHAR.sub("_", text)[:MAX_WORKLOAD_CHARS]
    if cleaned != text:
        _client.warn_once(
            f"workload:{text}",
            "wattmeter: workload %r has characters other than [A-Za-z0-9._:/-] or is over %d long; sent as %r",
            text,
            MAX_WORKLOAD_CHARS,
            cleaned,
        )
    if not cleaned:
        _client.warn_once("workload-empty", "wattmeter: an empty workload name is refused by the agent")
    return cleaned


_client = _Client()


def register(
    workload: str, phase: str = "unknown", job: str = "", labels: Mapping[str, str] | None = None
) -> Registration:
    """Tell the agent this process is ``workload``, in ``phase`` (training, inference, unknown), part of ``job``.

    Returns at once and never raises; usable as a context manager (the registration ends on exit) or as a plain
    call (it lasts until the process exits, ``close()``, or the next ``register()``).
    """
    client = _client
    try:
        registration = Registration(
            client,
            _clean_workload(workload),
            _clean_phase(phase),
            str(job).strip()[:MAX_JOB_CHARS],
            {str(key): str(value) for key, value in (labels or {}).items()},
        )
        if len(client._register_message(registration)) > MAX_MESSAGE_BYTES + 1:  # +1: the newline
            client.warn_once("labels-size", "wattmeter: labels too large for one message; registered without them")
            registration.labels = {}
    except Exception:  # e.g. a label whose __str__ raises
        log.debug("wattmeter client: bad register() arguments", exc_info=True)
        registration = Registration(client, "unknown", "unknown", "", {})
        client.warn_once("bad-args", "wattmeter: register() arguments could not be used; registered as 'unknown'")
    try:
        client.add(registration)
    except Exception:
        log.debug("wattmeter client: register failed", exc_info=True)
    return registration


def close() -> None:
    """End every registration of this process and close the connection (the agent sees the process go)."""
    try:
        _client.close()
    except Exception:
        log.debug("wattmeter client: close failed", exc_info=True)


def _after_fork_in_child() -> None:
    _client.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
