"""Tell the local Wattmeter agent which workload this process is, so its GPU and CPU energy is attributed to it.

Use it from inference servers and training jobs::

    import collector.client

    with collector.client.register("llama-70b", phase="training", job="run-42") as reg:
        train()
        with reg.phase("inference"):  # evaluation; the previous phase comes back on exit
            evaluate()

or as a plain call, which stays in force until the process exits (or ``close()``)::

    collector.client.register("llama-70b-serve", phase="inference")

Inference servers also report each request, so its energy can be told apart (energy per request)::

    with collector.client.request(request_id, model="llama-70b", tenant="acme") as r:
        r.started()        # optional: it left the queue (the time before it gets no energy)
        ...
        r.prefill_done()   # optional: the prefill/decode boundary
        ...
        r.tokens(input=512, output=128)

or, for servers that are not shaped for a ``with``, ``report_span(request_id, start_ns, end_ns, ...)`` afterwards;
``current_request()`` is the span of the innermost ``with request(...)`` (or ``EnergyMiddleware``) around the caller.
``EnergyMiddleware`` wraps an ASGI app (FastAPI, Starlette) so that each HTTP request is one span. A process need not
register to report spans: the agent knows its pid from the socket and finds its workload by it.

Training loops report the steps (or any unit of work) they complete, so energy per step can be told::

    for batch in loader:
        train_step(batch)
        collector.client.step()       # or step(n) for n units at once

``step()`` only adds to an in-process counter (about a microsecond); the watcher thread sends the count
accumulated since its last send at most once a second, before a phase change or a new ``register()`` (so steps
count under the phase they were done in), and at exit. Like spans, steps need no registration.

This module runs inside other people's processes, so it imports only the standard library (nothing from
``collector``), never blocks the caller and never raises into it:

- With no agent (no socket, connection refused, permission denied) it logs ONE warning on the
  ``wattmeter.client`` logger and carries on silently; later calls retry connecting at most every
  ``RETRY_INTERVAL_S`` seconds, without logging again.
- Sends are non-blocking (``MSG_DONTWAIT`` on a non-blocking socket). When the socket buffer is full the message is
  dropped and counted in the module-level ``dropped``; the full state is re-sent once the socket drains, so the
  agent ends up with the latest phase even when some changes were dropped.
- A span is sent once, when its request ends, on the same connection (opened on demand). With no agent, or the socket
  buffer full, it is dropped and counted in ``spans_dropped`` (and ``dropped``); nothing is queued in the process.
- Steps are sent as one count per flush. With no agent (or the connection broken) the count is dropped and added to
  ``steps_dropped`` (the agent measured no energy then either); when the socket buffer is full it waits for the next
  flush, so a slow agent loses none. ``steps_sent`` counts the steps handed to the socket.
- A daemon thread (``wattmeter-client``, one per process, running while something is registered, and from the
  first ``step()`` for the rest of the process's life) notices when the agent goes away, reconnects and registers
  again, so an agent restart loses nothing; it also flushes the step count.
- One lock guards the socket; it is held only around non-blocking system calls. The step counter has a lock of its
  own, held only to add or take the count, so ``step()`` never waits for a send.
- A forked child starts with no connection and a step count of 0: what the parent counted is the parent's to send.

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
    {"v": 1, "type": "span", "request_id": "req-1", "start_ns": 1767225600000000000, "end_ns": 1767225601500000000,
     "model": "llama-70b", "tenant": "acme", "input_tokens": 512, "output_tokens": 128,
     "queue_end_ns": 1767225600020000000, "prefill_end_ns": 1767225600200000000}
    {"v": 1, "type": "steps", "count": 250}

- ``register`` sets everything the agent knows about the connection's process; ``phase`` changes only the phase and
  is ignored before a ``register``. Sending ``register`` again is always allowed (the client re-sends it after a
  reconnect or after dropped messages).
- ``workload``: 1-128 characters of ``[A-Za-z0-9._:/-]`` after trimming. ``phase``: ``training``, ``inference`` or
  ``unknown`` (default ``unknown``). ``job``: at most 256 characters (default empty). ``labels``: an object of
  string values (default empty).
- ``span`` (folded above, one line on the wire) reports one served request; it needs no ``register`` first and
  changes no registration. ``request_id``: 1-256 characters, no control characters; several spans (hosts, pipeline
  stages) of one request add up under it. ``start_ns`` <= ``end_ns``: Unix ns (``time.time_ns()``), integers, at
  most a day apart, not in the future (5 minutes of slack), at most a week old. Optional: ``queue_end_ns`` (it left
  the queue: no energy before it) and ``prefill_end_ns`` (prefill/decode boundary), each 0 (not reported) or within
  the span, the queue end first; ``input_tokens``, ``output_tokens``: integers 0..2**40 (default 0); ``model``,
  ``tenant``: at most 256 characters; ``workload``: empty (default: the agent finds it by the pid) or a name as in
  ``register``; ``labels``: at most 16, named like Prometheus labels, string values up to 256 characters (the bounds
  of ``register``'s labels too). A span with any field out of bounds is refused whole. Every line counts against
  the agent's per-connection rate limit (``[api] max_messages_per_s``, 1000 by default).
- ``steps`` reports ``count`` (an integer 1..2**40) training steps or work units completed since the process's
  previous steps message; it needs no ``register`` first and changes no registration. The agent books them under
  the workload of the connection's registration when the message arrives, else the one it finds for the pid.
- The pid is not in the message: the agent takes pid, uid and gid from the socket (``SO_PEERCRED``), so a process
  can only speak for itself. Closing the connection (or exiting) ends the registration.
- Within a major version, fields are only ever added; the agent ignores fields it does not know. A message with an
  unknown ``type`` is ignored; one with a ``v`` the agent does not support gets the connection closed.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import operator
import os
import re
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_SOCKET",
    "ENV_SOCKET",
    "MAX_MESSAGE_BYTES",
    "PHASES",
    "PROTOCOL_VERSION",
    "RETRY_INTERVAL_S",
    "EnergyMiddleware",
    "Registration",
    "RequestSpan",
    "close",
    "current_request",
    "dropped",
    "register",
    "report_span",
    "request",
    "spans_dropped",
    "spans_sent",
    "step",
    "steps_dropped",
    "steps_sent",
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
# The agent's bounds on a span (collector.registration): the client keeps to them, so a span is not refused whole.
MAX_REQUEST_ID_CHARS = 256
MAX_MODEL_CHARS = 256
MAX_TENANT_CHARS = 256
MAX_TOKENS = 2**40
MAX_LABELS = 16
MAX_LABEL_VALUE_CHARS = 256
MAX_STEPS = 2**40
"""The most steps one ``step()`` call (and one message) may carry."""
STEPS_FLUSH_INTERVAL_S = 1.0
"""Seconds between two sends of the step count (the agent's series move once a second at most)."""

dropped = 0
"""Messages not handed to the socket (no agent, socket buffer full, connection broken), since the process started."""
spans_sent = 0
"""Request spans handed to the socket, since the process started."""
spans_dropped = 0
"""Request spans not handed to the socket (no agent, socket buffer full, unusable times); also in ``dropped``."""
steps_sent = 0
"""Steps (not messages) handed to the socket, since the process started."""
steps_dropped = 0
"""Steps counted by ``step()`` but dropped (no agent, connection broken); each dropped message is in ``dropped``."""

log = logging.getLogger("wattmeter.client")

_NOT_WORKLOAD_CHAR = re.compile(r"[^A-Za-z0-9._:/-]")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_SPAN_ID = re.compile(r"[0-9A-Za-z._:-]{1,64}")
_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)  # no SIGPIPE in their process
_POLL_S = 1.0  # how often the watcher thread looks at the connection when nothing happens
_MAX_WARNINGS_PER_KIND = 16  # warn-once keys that carry a value ("workload:<name>"): a bound, on memory and the log
_SURROGATES = re.compile("[\ud800-\udfff]")


def _count_drop() -> None:
    global dropped
    dropped += 1


def _count_span(sent: bool) -> None:
    global spans_sent, spans_dropped
    if sent:
        spans_sent += 1
    else:
        spans_dropped += 1
        _count_drop()


def _count_steps(sent: int, lost: int) -> None:
    global steps_sent, steps_dropped
    steps_sent += sent
    if lost:
        steps_dropped += lost
        _count_drop()


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
        self._warned_kinds: dict[str, int] = {}  # how many keys of each kind (the part before ":") were warned
        self._steps_lock = threading.Lock()  # only around the count: step() never waits for a send
        self._steps = 0  # counted by step(), not yet handed to the socket
        self.steps_used = False  # step() was called: the watcher flushes the count for the rest of the process
        self._next_steps_flush = 0.0

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
            self._flush_steps_before_change_locked()
            warning = self._send_locked(full=True)
        self._log_unreachable(warning)

    def remove(self, registration: Registration) -> None:
        warning = None
        with self._lock:
            if registration not in self._stack:
                return
            was_current = self._stack[-1] is registration
            if was_current:
                self._flush_steps_before_change_locked()
            self._stack.remove(registration)
            if not self._stack:
                self._close_on_purpose_locked()
            elif was_current:
                warning = self._send_locked(full=True)
        self._log_unreachable(warning)

    def set_phase(self, registration: Registration, phase: str) -> None:
        warning = None
        with self._lock:
            changed = registration._phase != phase
            registration._phase = phase
            if changed and self._stack and self._stack[-1] is registration:
                self._flush_steps_before_change_locked()
                warning = self._send_locked(full=False)
        self._log_unreachable(warning)

    def send_span(self, data: bytes) -> bool:
        """Hand one span line to the socket now, connecting if need be, or drop it; counted either way."""
        warning = None
        with self._lock:
            sent = False
            for _ in range(2):  # a connection found broken (agent restarted) gets one immediate reconnect
                if self._sock is None:
                    warning = self._connect_locked() or warning
                    if self._sock is None:
                        break
                sent = self._send_span_locked(data)
                if sent or self._sock is not None:
                    break
            if self._pending:  # part of a line is left: the watcher finishes it once the socket drains
                self._ensure_watcher_locked()
            _count_span(sent)
        self._log_unreachable(warning)
        return sent

    def _send_span_locked(self, data: bytes) -> bool:
        if self._stack and self._resync and not self._pending:
            # a new connection: the agent hears who this process is before anything else
            if self._write_locked(self._register_message(self._stack[-1])):
                self._resync = False
            elif self._sock is None:
                return False
        return self._write_locked(data)

    def close(self) -> None:
        with self._lock:
            if self._stack:
                self._flush_steps_before_change_locked()
            self._stack.clear()
            self._close_on_purpose_locked()

    def _close_on_purpose_locked(self) -> None:
        """End the registration by closing the connection. The agent was there: a span right after may connect
        again at once (the retry interval spaces attempts at an agent that is away, not this)."""
        if self._sock is not None:
            self._next_attempt = 0.0
        self._disconnect_locked()

    def add_steps(self, count: int) -> None:
        with self._steps_lock:
            self._steps += count
        if not self.steps_used or self._watcher is None:  # the first step, or the watcher ended: (re)start it
            with self._lock:
                self.steps_used = True
                self._ensure_watcher_locked()

    @property
    def steps_pending(self) -> int:
        """Steps counted and not yet handed to the socket."""
        return self._steps

    def flush_steps(self, timeout_s: float = 0.2) -> None:
        """Send the step count now (at exit); gives up rather than wait ``timeout_s`` for the socket's lock."""
        if not self._lock.acquire(timeout=timeout_s):
            return
        try:
            warning = self._flush_steps_locked()
        finally:
            self._lock.release()
        self._log_unreachable(warning)

    def _flush_steps_before_change_locked(self) -> None:
        """Before the process's registration or phase changes: its steps so far go under the registration they were
        done in. Only on a connection the agent already knows the process on (a new one is a pid lookup anyway)."""
        if self.steps_used and self._sock is not None and not self._resync:
            self._flush_steps_locked()

    def _flush_steps_locked(self) -> str | None:
        """Hand the step count to the socket, connecting if need be; returns the warning to log (outside the lock).

        A full socket buffer keeps the count for the next flush; no agent, or a broken connection, drops it."""
        with self._steps_lock:
            count = min(self._steps, MAX_STEPS)
            self._steps -= count
        if count == 0:
            return None
        warning = None
        for _ in range(2):  # a connection found broken (agent restarted) gets one immediate reconnect
            if self._sock is None:
                warning = self._connect_locked() or warning
                if self._sock is None:
                    break
            if self._send_steps_locked(count):
                _count_steps(count, 0)
                return warning
            if self._sock is not None:  # the buffer is full: the agent is there, just slow
                with self._steps_lock:
                    self._steps += count
                self._ensure_watcher_locked()
                return warning
        _count_steps(0, count)
        return warning

    def _send_steps_locked(self, count: int) -> bool:
        if self._stack and self._resync and not self._pending:
            # a new connection: the agent hears who this process is before anything else
            if self._write_locked(self._register_message(self._stack[-1])):
                self._resync = False
            elif self._sock is None:
                return False
        return self._write_locked(_encode({"v": PROTOCOL_VERSION, "type": "steps", "count": count}))

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
        self._steps_lock = threading.Lock()
        self._steps = 0
        self.steps_used = False
        self._next_steps_flush = 0.0

    def warn_once(self, key: str, message: str, *args: object) -> None:
        if key in self._warned_once:
            return
        kind = key.partition(":")[0]
        seen = self._warned_kinds.get(kind, 0)
        if seen >= _MAX_WARNINGS_PER_KIND:  # values from request data: never one key (and line) per value
            return
        self._warned_kinds[kind] = seen + 1
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
        warning = steps_warning = None
        wait_s = 0.0
        with self._lock:
            if not self._stack and not (self._sock is not None and self._pending) and not self.steps_used:
                # Nothing registered, no span half sent, no steps to count. Give up the watcher role under the
                # lock, so a register() from now on starts a new watcher rather than relying on this exiting one.
                if self._watcher is threading.current_thread():
                    self._watcher = None
                return False
            now = time.monotonic()
            if self.steps_used and now >= self._next_steps_flush:
                self._next_steps_flush = now + STEPS_FLUSH_INTERVAL_S
                steps_warning = self._flush_steps_locked()
            # never past the next step flush: sleep, or poll the connection, until then at the latest
            until_flush_s = self._next_steps_flush - now if self.steps_used else _POLL_S
            sock = self._sock
            # a resync without a registration has nothing to send (a connection opened for spans or steps)
            wants_write = bool(self._pending) or (self._resync and bool(self._stack))
            if sock is None:
                wait_s = self._next_attempt - now
                if wait_s <= 0 and self._stack:
                    warning = self._send_locked(full=True, retry=True)
                wait_s = max(0.0, min(wait_s, until_flush_s)) if self._stack else until_flush_s
        self._log_unreachable(steps_warning)
        self._log_unreachable(warning)
        if sock is None:
            if wait_s > 0:
                time.sleep(min(wait_s, _POLL_S))
            return True
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | (select.POLLOUT if wants_write else 0))
            events = poller.poll(max(0.0, min(_POLL_S, until_flush_s)) * 1000)
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
    text, shown = text[:64], str(phase).strip()[:64]
    _client.warn_once(f"phase:{text}", "wattmeter: phase %r is not one of %s; using 'unknown'", shown, PHASES)
    return "unknown"


def _clean_workload(workload: object) -> str:
    text = str(workload).strip()
    cleaned = _NOT_WORKLOAD_CHAR.sub("_", text[:MAX_WORKLOAD_CHARS])  # cut first: a huge name costs no more
    if cleaned != text:
        shown = text[: MAX_WORKLOAD_CHARS + 1]
        _client.warn_once(
            f"workload:{shown}",
            "wattmeter: workload %r has characters other than [A-Za-z0-9._:/-] or is over %d long; sent as %r",
            shown,
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
            _utf8(str(job).strip()[:MAX_JOB_CHARS]),
            {str(key): str(value) for key, value in (labels or {}).items()},
        )
        if len(client._register_message(registration)) > MAX_MESSAGE_BYTES + 1:  # +1: the newline
            client.warn_once("labels-size", "wattmeter: labels too large for one message; registered without them")
            registration.labels = {}
        else:  # the agent refuses a registration whose labels are out of its bounds whole
            registration.labels = _clean_labels(registration.labels, "register")
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


# --- training steps -----------------------------------------------------------------------------------------------


def step(n: int = 1) -> None:
    """Count ``n`` (default 1) training steps, or units of work, done by this process. Cheap enough for every step
    of a loop: it adds to a counter that a background thread sends to the agent about once a second and at exit.
    ``n`` is an integer 0..2**40; anything else is ignored with one warning. Never raises, never blocks."""
    try:
        if type(n) is not int:
            n = _step_count(n)
        elif not 0 < n <= MAX_STEPS:
            n = 0 if n == 0 else _step_count(n)
        if n:
            _client.add_steps(n)
    except Exception:
        _log_error_once("step")


def _step_count(n: object) -> int:
    """The count ``n`` stands for (numpy integers and the like), or 0 with one warning."""
    count = None
    if not isinstance(n, bool):
        with contextlib.suppress(TypeError, ValueError):
            count = operator.index(n)  # type: ignore[arg-type]
    if count is not None and 0 <= count <= MAX_STEPS:
        return count
    _client.warn_once("step-count", "wattmeter: step(n) takes an integer 0..2**40 (got %r); such calls are ignored", n)
    return 0


def _flush_steps_at_exit() -> None:
    try:
        if _client.steps_used:
            _client.flush_steps()
    except Exception:
        pass


atexit.register(_flush_steps_at_exit)


# --- request spans ------------------------------------------------------------------------------------------------

# Bounds the agent puts on span times (collector.registration), checked here so a wrong unit is said once, here.
_MIN_TIME_NS = 10**18  # 2001-09-09: anything earlier is seconds or milliseconds, not ns
_MAX_SPAN_NS = 24 * 3600 * 10**9
_MAX_SPAN_AGE_NS = 7 * 24 * 3600 * 10**9
_MAX_SPAN_FUTURE_NS = 300 * 10**9

_current: contextvars.ContextVar[RequestSpan | None] = contextvars.ContextVar("wattmeter_request", default=None)


def _log_error_once(where: str) -> None:
    """Log the exception being handled, once per ``where`` for the life of the process; never raises."""
    try:
        key = f"error:{where}"
        if key in _client._warned_once:
            return
        _client._warned_once.add(key)
        log.warning("wattmeter client: %s failed; ignored (not logged again)", where, exc_info=True)
    except Exception:
        pass


def _new_request_id() -> str:
    return os.urandom(16).hex()


class RequestSpan:
    """One request being served, from ``request()``: reported to the agent once, when it ends (leaving the ``with``
    block, or ``end()``). Times are Unix ns. Attributes (``model``, ``tenant``, ``workload``, ``labels``) may be set
    until then. Every method returns at once and never raises; use one span from one thread at a time."""

    def __init__(
        self,
        request_id: str,
        model: str = "",
        tenant: str = "",
        workload: str = "",
        labels: Mapping[str, str] | None = None,
        start_ns: int | None = None,
    ) -> None:
        self._wall0 = time.time_ns()
        self._mono0 = time.monotonic_ns()
        self.request_id = request_id
        self.model = model
        self.tenant = tenant
        self.workload = workload
        self.labels: Mapping[str, str] = labels if labels is not None else {}
        self.start_ns: int = self._wall0 if start_ns is None else start_ns
        """When the request arrived (Unix ns): when ``request()`` was called, unless given."""
        self.end_ns: int | None = None
        self.queue_end_ns = 0
        self.prefill_end_ns = 0
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.sent: bool | None = None
        """None until the span ends; then whether it was handed to the agent's socket."""
        self.span_id = os.urandom(8).hex()
        """Identifies this span within its request: a span that reaches the aggregator twice is stored once."""
        self._response_end_ns: int | None = None
        self._context_tokens: list[contextvars.Token[RequestSpan | None]] = []

    def _now_ns(self) -> int:
        """Unix ns on this span's clock: the wall clock at its start plus monotonic time since, so a clock step
        during the request can never make it end before it began."""
        return self._wall0 + (time.monotonic_ns() - self._mono0)

    def tokens(self, input: int | None = None, output: int | None = None) -> None:
        """Set the request's token counts (prompt tokens, generated tokens); a count left out keeps its value."""
        if input is not None:
            self.input_tokens = input
        if output is not None:
            self.output_tokens = output

    def started(self, time_ns: int | None = None) -> None:
        """The request left the queue and began to run (now, or at ``time_ns``): the time before gets no energy."""
        try:
            self.queue_end_ns = self._now_ns() if time_ns is None else time_ns
        except Exception:
            _log_error_once("RequestSpan.started")

    def prefill_done(self, time_ns: int | None = None) -> None:
        """The prefill (prompt) phase ended and decoding began (now, or at ``time_ns``)."""
        try:
            self.prefill_end_ns = self._now_ns() if time_ns is None else time_ns
        except Exception:
            _log_error_once("RequestSpan.prefill_done")

    def end(self, time_ns: int | None = None) -> None:
        """End the request (now, or at ``time_ns``) and report it; later calls do nothing."""
        if self.sent is not None:
            return
        try:
            if time_ns is not None:
                self.end_ns = time_ns
            elif self._response_end_ns is not None:
                self.end_ns = self._response_end_ns
            else:
                self.end_ns = self._now_ns()
            self.sent = _report(self, self.end_ns)
        except Exception:
            self.sent = False
            _log_error_once("RequestSpan.end")
            with contextlib.suppress(Exception), _client._lock:
                _count_span(False)

    def __enter__(self) -> RequestSpan:
        try:
            self._context_tokens.append(_current.set(self))
        except Exception:
            _log_error_once("RequestSpan.__enter__")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A failed request used energy too: it is reported, and its exception goes on unchanged.
        self.end()
        try:
            if self._context_tokens:
                _current.reset(self._context_tokens.pop())
        except Exception:  # ValueError: exited in another context than entered (an async generator, say)
            _log_error_once("RequestSpan.__exit__")

    def __repr__(self) -> str:
        return f"RequestSpan(request_id={self.request_id!r}, model={self.model!r}, sent={self.sent!r})"


def request(
    request_id: str | None = None,
    *,
    model: str = "",
    tenant: str = "",
    workload: str = "",
    labels: Mapping[str, str] | None = None,
    start_ns: int | None = None,
) -> RequestSpan:
    """Start a span for one request (``request_id``: generated when None or empty); report it by leaving the
    ``with`` block or calling ``end()``. ``workload`` is needed only when the process serves several workloads or
    did not register: otherwise the agent finds it by the pid. Never raises."""
    try:
        rid = _new_request_id() if request_id is None or request_id == "" else request_id
        return RequestSpan(rid, model, tenant, workload, labels, start_ns)
    except Exception:
        _log_error_once("request")
        return RequestSpan(_new_request_id())


def current_request() -> RequestSpan | None:
    """The span of the innermost ``with request(...)`` (or ``EnergyMiddleware`` request) around the caller."""
    try:
        return _current.get()
    except Exception:
        return None


def report_span(
    request_id: str,
    start_ns: int,
    end_ns: int,
    *,
    model: str = "",
    tenant: str = "",
    workload: str = "",
    labels: Mapping[str, str] | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    queue_end_ns: int = 0,
    prefill_end_ns: int = 0,
    span_id: str | None = None,
) -> bool:
    """Report a request that ran from ``start_ns`` to ``end_ns`` (Unix ns, ``time.time_ns()``), for servers that are
    not shaped for ``with request(...)``. ``span_id`` (up to 64 of ``[0-9A-Za-z._:-]``; random when None) tells the
    spans of one request apart: report a span again with the same id and it is counted once. Returns whether the
    span was handed to the agent's socket; never raises."""
    try:
        span = RequestSpan(request_id, model, tenant, workload, labels, start_ns)
        if span_id is not None:
            span.span_id = span_id
        span.tokens(input_tokens, output_tokens)
        span.queue_end_ns = queue_end_ns
        span.prefill_end_ns = prefill_end_ns
        span.end(end_ns)
        return bool(span.sent)
    except Exception:
        _log_error_once("report_span")
        return False


def _report(span: RequestSpan, end_ns: int) -> bool:
    data = _span_message(span, end_ns)
    if data is None:
        with _client._lock:
            _count_span(False)
        return False
    return _client.send_span(data)


def _span_message(span: RequestSpan, end_ns: int) -> bytes | None:
    """The span's wire line with every field within the agent's bounds; None when its times cannot be sent.

    A field that cannot be used is left out (warned once), so one bad value never costs the whole span.
    """
    start_ns, end_ns_or_none = _as_int(span.start_ns), _as_int(end_ns)
    if start_ns is None or end_ns_or_none is None:
        _client.warn_once("span-time-type", "wattmeter: span times must be integers (Unix ns); such spans are dropped")
        return None
    end_ns = end_ns_or_none
    if not _sane_times(start_ns, end_ns):
        return None
    message: dict[str, object] = {
        "v": PROTOCOL_VERSION,
        "type": "span",
        "request_id": _clean_request_id(span.request_id),
        "start_ns": start_ns,
        "end_ns": end_ns,
    }
    span_id = span.span_id
    if isinstance(span_id, str) and _SPAN_ID.fullmatch(span_id):
        message["span_id"] = span_id
    elif span_id:
        _client.warn_once("span-id", "wattmeter: a span_id must be up to 64 of [0-9A-Za-z._:-]; sent without it")
    for name, value, limit in (("model", span.model, MAX_MODEL_CHARS), ("tenant", span.tenant, MAX_TENANT_CHARS)):
        text = _clean_text(name, value, limit)
        if text:
            message[name] = text
    workload = (_as_text(span.workload) or "").strip()
    if workload:
        message["workload"] = _clean_workload(workload)
    for name, count in (("input_tokens", span.input_tokens), ("output_tokens", span.output_tokens)):
        if count is not None:
            message[name] = _clean_tokens(name, count)
    queue_end_ns = _clean_boundary("queue_end_ns", span.queue_end_ns, start_ns, end_ns)
    prefill_end_ns = _clean_boundary("prefill_end_ns", span.prefill_end_ns, start_ns, end_ns)
    if queue_end_ns and prefill_end_ns and prefill_end_ns < queue_end_ns:
        _client.warn_once("span-order", "wattmeter: a span's prefill ended before it left the queue; sent without")
        queue_end_ns = prefill_end_ns = 0
    if queue_end_ns:
        message["queue_end_ns"] = queue_end_ns
    if prefill_end_ns:
        message["prefill_end_ns"] = prefill_end_ns
    labels = _clean_labels(span.labels, "span")
    if labels:
        message["labels"] = labels
    data = _encode(message)
    if len(data) > MAX_MESSAGE_BYTES + 1 and labels:  # +1: the newline
        _client.warn_once("span-size", "wattmeter: span labels too large for one message; sent without them")
        del message["labels"]
        data = _encode(message)
    return data


def _sane_times(start_ns: int, end_ns: int) -> bool:
    now_ns = time.time_ns()
    if start_ns < _MIN_TIME_NS or end_ns < _MIN_TIME_NS:
        problem = "times are Unix nanoseconds (time.time_ns()), not seconds or milliseconds"
    elif end_ns < start_ns:
        problem = "a span ends before it starts"
    elif end_ns - start_ns > _MAX_SPAN_NS:
        problem = "a span is longer than a day"
    elif end_ns > now_ns + _MAX_SPAN_FUTURE_NS or start_ns < now_ns - _MAX_SPAN_AGE_NS:
        problem = "a span is in the future or over a week old"
    else:
        return True
    _client.warn_once(
        f"span-time:{problem}", "wattmeter: %s; such spans are dropped (counted in spans_dropped)", problem
    )
    return False


def _as_int(value: object) -> int | None:
    number: Any = value  # numpy integers and the like
    try:
        return int(number)
    except Exception:  # TypeError, ValueError, OverflowError; a torch tensor of several elements: RuntimeError
        return None


def _as_text(value: object) -> str | None:
    try:
        return _utf8(str(value))
    except Exception:  # a __str__ that raises
        _log_error_once("str() of a span or label field")
        return None


def _utf8(text: str) -> str:
    """``text`` with each surrogate (undecodable bytes of os.environ, argv or file names) as U+FFFD: JSON would
    carry it, but the agent could never encode it (protobuf, Prometheus), so the span or registration is lost."""
    return text if text.isascii() else _SURROGATES.sub("\ufffd", text)


def _clean_request_id(value: object) -> str:
    text = _as_text(value) or ""
    cleaned = _CONTROL_CHARS.sub("_", text[:MAX_REQUEST_ID_CHARS]) or _new_request_id()
    if cleaned != text:
        _client.warn_once(
            "request-id", "wattmeter: request ids are 1-%d characters without control characters", MAX_REQUEST_ID_CHARS
        )
    return cleaned


def _clean_text(name: str, value: object, limit: int) -> str:
    text = _as_text(value) or ""
    if len(text) > limit:
        _client.warn_once(f"span-{name}", "wattmeter: a span's %s is over %d characters; cut", name, limit)
        text = text[:limit]
    return text


def _clean_tokens(name: str, value: object) -> int:
    count = _as_int(value)
    if count is not None and 0 <= count <= MAX_TOKENS:
        return count
    _client.warn_once(f"span-{name}", "wattmeter: %s must be an integer 0..2**40 (got %r); sent as 0", name, value)
    return 0


def _clean_boundary(name: str, value: object, start_ns: int, end_ns: int) -> int:
    if value is None:
        return 0
    time_ns = _as_int(value)  # never value == 0: an array-like's truth value raises
    if time_ns == 0:
        return 0
    if time_ns is not None and start_ns <= time_ns <= end_ns:
        return time_ns
    _client.warn_once(f"span-{name}", "wattmeter: a span's %s is outside the span; sent without it", name)
    return 0


def _clean_labels(labels: object, what: str) -> dict[str, str]:
    """The labels the agent accepts (``register``'s and a span's bounds are the same); the others are left out."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        _client.warn_once(
            f"{what}-labels-type", "wattmeter: %s labels must be a mapping of strings; sent without", what
        )
        return {}
    if not labels:
        return {}
    cleaned: dict[str, str] = {}
    for key, value in labels.items():
        name, text = _as_text(key), _as_text(value)
        if name is None or text is None or len(cleaned) >= MAX_LABELS:
            continue
        if _LABEL_NAME.fullmatch(name) and len(text) <= MAX_LABEL_VALUE_CHARS:
            cleaned[name] = text
    if len(cleaned) != len(labels):
        _client.warn_once(
            f"{what}-labels",
            "wattmeter: %s labels are at most %d, named like Prometheus labels, values up to %d characters; "
            "the others are left out",
            what,
            MAX_LABELS,
            MAX_LABEL_VALUE_CHARS,
        )
    return cleaned


# --- ASGI -------------------------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _header(scope: Scope, name: str) -> str:
    """The first value of header ``name`` in an ASGI scope ("" when absent); ASGI gives names lowercased."""
    wanted = name.lower().encode("latin-1")
    for key, value in scope.get("headers") or ():
        if bytes(key).lower() == wanted:
            return bytes(value).decode("latin-1")
    return ""


class EnergyMiddleware:
    """Pure ASGI middleware (FastAPI, Starlette, any ASGI server): each HTTP request the app serves is one span.

    ``app.add_middleware(EnergyMiddleware, model="llama-70b")`` or ``EnergyMiddleware(app, model=...)``. The request
    id is the ``request_id_header`` (default ``x-request-id``) when the client sent one, else generated. ``model``
    and ``tenant`` are a string, or a callable given the ASGI scope, or else read from ``model_header`` /
    ``tenant_header``. The span runs from the request's arrival to the end of its response body; the app reaches it
    with ``collector.client.current_request()`` (to set tokens, ``started()``, ``prefill_done()``). Lifespan and
    websocket scopes pass through untouched; nothing here ever raises into the app or changes what it raises.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        model: str | Callable[[Scope], str | None] | None = None,
        model_header: str | None = None,
        tenant: str | Callable[[Scope], str | None] | None = None,
        tenant_header: str | None = None,
        request_id_header: str = "x-request-id",
        workload: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.model = model
        self.model_header = model_header
        self.tenant = tenant
        self.tenant_header = tenant_header
        self.request_id_header = request_id_header
        self.workload = workload
        self.labels = dict(labels or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        span = self._open(scope) if scope.get("type") == "http" else None
        if span is None:
            await self.app(scope, receive, send)
            return

        async def send_and_watch(message: Message) -> None:
            await send(message)
            try:
                if message.get("type") == "http.response.body" and not message.get("more_body", False):
                    span._response_end_ns = span._now_ns()
            except Exception:
                _log_error_once("EnergyMiddleware send")

        with span:
            await self.app(scope, receive, send_and_watch)

    def _open(self, scope: Scope) -> RequestSpan | None:
        try:
            return request(
                _header(scope, self.request_id_header) or None,
                model=self._value(scope, self.model, self.model_header),
                tenant=self._value(scope, self.tenant, self.tenant_header),
                workload=self.workload,
                labels=dict(self.labels),  # the span's own: what the app adds to one request stays in it
            )
        except Exception:
            _log_error_once("EnergyMiddleware")
            return None

    @staticmethod
    def _value(scope: Scope, given: str | Callable[[Scope], str | None] | None, header: str | None) -> str:
        value: str | None = None
        if callable(given):
            try:
                value = given(scope)
            except Exception:
                _log_error_once("EnergyMiddleware model/tenant callable")
        elif given:
            value = given
        if not value and header:
            value = _header(scope, header)
        return str(value or "")


def _after_fork_in_child() -> None:
    _client.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
