"""The agent's side of workload registration: a Unix socket where processes say which workload they are, and
report the request spans they served and the training steps (or work units) they completed.

The protocol is documented in ``collector.client`` (newline-delimited JSON, version 1). The pid, uid and gid of each
event come from the kernel (``SO_PEERCRED``, taken when the client connected), never from the message, so a process
can only speak for itself.

Everything is bounded, because any local user allowed on the socket can send anything:

- a line longer than ``max_message_bytes`` closes the connection (``oversize``);
- each connection has a token bucket of ``max_messages_per_s`` (burst: one second's worth); messages beyond it are
  dropped (``rate_limited``);
- at most ``max_connections`` connections; further ones are closed at once (``connection_limit``);
- bytes that are not a JSON object with an integer ``v`` and a string ``type`` (``garbage``), an unknown ``type``
  (``unknown_type``), a phase message before any register (``not_registered``) or a refused field (``workload``,
  ``phase``, ``field``; for a span also ``request_id`` and ``time``; for steps ``count``) are counted and ignored;
  an unsupported ``v`` (``version``) also closes the connection. A refused span is also counted in
  ``spans_refused``, a refused steps message in ``steps_refused``.

A span message needs no registration: its pid (from ``SO_PEERCRED``) is what lets the aggregator find its workload
when it names none. It goes to ``on_span`` and never changes the connection's registration. A steps message
(``count``: an integer 1..2**40, the steps done since the process's previous one) needs no registration either; it
goes to ``on_steps`` with the connection's registration as it stood when it arrived (None when there was none).

One daemon thread serves every connection through ``selectors``; callbacks run on it, so they should be quick. Nothing
raises out of it: an error in a callback is logged and counted in ``callback_errors``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from collector.errors import RegistrationSocketError

if TYPE_CHECKING:
    from collector.config import ApiConfig

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
PHASES = ("training", "inference", "unknown")
MAX_JOB_CHARS = 256
MAX_LABELS = 16
MAX_LABEL_VALUE_CHARS = 256
MAX_REQUEST_ID_CHARS = 256
MAX_MODEL_CHARS = 256
MAX_TENANT_CHARS = 256
MAX_TOKENS = 2**40
MAX_STEPS = 2**40  # per message; the client sends about one a second, so no real loop comes near it
# Span times: Unix ns. Earlier than 2001-09-09 (1e18 ns) is a clock that was never set, or seconds sent for ns.
MIN_SPAN_TIME_NS = 10**18
MAX_SPAN_NS = 24 * 3600 * 10**9  # a request longer than a day is a bug (a start never reset), not a request
MAX_SPAN_AGE_NS = 7 * 24 * 3600 * 10**9  # spans come from live servers on this host: a week old is a broken clock
MAX_SPAN_FUTURE_NS = 300 * 10**9  # the client shares this host's clock; minutes of slack for a slow agent loop
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# A lone surrogate is valid JSON (the escape \\ud800) but no UTF-8 holds it: accepted, it made every later batch fail to
# serialize and /metrics fail to render. Refused in every free-text field.
_SURROGATES = re.compile("[\ud800-\udfff]")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SPAN_ID = re.compile(r"[0-9A-Za-z._:-]{0,64}")
_WORKLOAD = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_RECV_BYTES = 65536  # one recv per readable connection per loop turn, so one busy client cannot starve the rest
_ACCEPTS_PER_TURN = 64

ERROR_REASONS = (
    "garbage",
    "oversize",
    "version",
    "unknown_type",
    "not_registered",
    "workload",
    "phase",
    "field",
    "rate_limited",
    "connection_limit",
    "peercred",
    "request_id",
    "span_id",
    "time",
    "count",
)

EventKind = Literal["register", "phase"]
PhaseName = Literal["training", "inference", "unknown"]


@dataclass(frozen=True)
class RegistrationEvent:
    """A process's registration as it stands after one accepted message; pid/uid/gid are from ``SO_PEERCRED``."""

    pid: int
    uid: int
    gid: int
    workload: str
    phase: PhaseName
    job: str
    labels: Mapping[str, str] = field(default_factory=dict)
    kind: EventKind = "register"
    """``register`` for a register message, ``phase`` for a phase change (the other fields are then unchanged)."""


@dataclass(frozen=True)
class SpanEvent:
    """One request span a process reported; pid/uid/gid are from ``SO_PEERCRED``. Times are Unix ns; 0 for
    ``prefill_end_ns`` / ``queue_end_ns`` means not reported. ``workload`` is "" unless the client named one."""

    pid: int
    uid: int
    gid: int
    request_id: str
    start_ns: int
    end_ns: int
    model: str = ""
    tenant: str = ""
    workload: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    prefill_end_ns: int = 0
    queue_end_ns: int = 0
    span_id: str = ""


@dataclass(frozen=True)
class StepsEvent:
    """``count`` training steps (or work units) a process completed since its previous steps message; pid/uid/gid
    are from ``SO_PEERCRED``. ``registration``: the connection's registration when the message arrived, so steps
    done before a phase change (sent before it) are told from those after; None for a process that did not
    register (its workload is found by the pid)."""

    pid: int
    uid: int
    gid: int
    count: int
    registration: RegistrationEvent | None = None


class _TokenBucket:
    def __init__(self, rate_per_s: float, now: float) -> None:
        self.rate = rate_per_s
        self.capacity = max(1.0, rate_per_s)
        self.tokens = self.capacity
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Connection:
    def __init__(self, sock: socket.socket, pid: int, uid: int, gid: int, bucket: _TokenBucket) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.bucket = bucket
        self.buffer = bytearray()
        self.current: RegistrationEvent | None = None


class _Refused(Exception):
    def __init__(self, reason: str, close: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close = close
        self.span = False  # a span message: also counted in spans_refused
        self.steps = False  # a steps message: also counted in steps_refused


class RegistrationServer:
    """Serves the registration socket on a daemon thread; ``on_register`` gets a ``RegistrationEvent`` per accepted
    register or phase message, ``on_span`` a ``SpanEvent`` per accepted span (without it, accepted spans are only
    counted), ``on_steps`` a ``StepsEvent`` per accepted steps message (likewise), ``on_disconnect`` the pid of
    each registered connection that closes."""

    def __init__(
        self,
        socket_path: Path,
        mode: int = 0o660,
        max_message_bytes: int = 65536,
        max_messages_per_s: float = 1000.0,
        *,
        on_register: Callable[[RegistrationEvent], None],
        on_disconnect: Callable[[int], None] | None = None,
        on_span: Callable[[SpanEvent], None] | None = None,
        on_steps: Callable[[StepsEvent], None] | None = None,
        max_connections: int = 1024,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.mode = mode
        self.max_message_bytes = max_message_bytes
        self.max_messages_per_s = max_messages_per_s
        self.max_connections = max_connections
        self._on_register = on_register
        self._on_disconnect = on_disconnect
        self._on_span = on_span
        self._on_steps = on_steps
        self.errors = 0
        """Messages and connections refused, all reasons together; ``error_counts`` has them by reason."""
        self.error_counts: dict[str, int] = dict.fromkeys(ERROR_REASONS, 0)  # fixed keys: safe to read from any thread
        self.accepted = 0
        """Messages accepted (register, phase, span and steps)."""
        self.spans_accepted = 0
        self.spans_refused = 0
        """Span messages refused for what they held (also in ``errors`` by reason); rate-limited lines are not
        parsed, so they are only in ``error_counts["rate_limited"]``."""
        self.steps_accepted = 0
        """Steps messages accepted (not steps: a message carries many)."""
        self.steps_refused = 0
        """Steps messages refused for what they held (also in ``errors`` by reason)."""
        self.callback_errors = 0
        self._connections: dict[int, _Connection] = {}
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._socket_inode: tuple[int, int] | None = None
        self._warned_fd_limit = False

    @classmethod
    def from_config(
        cls,
        api: ApiConfig,
        *,
        on_register: Callable[[RegistrationEvent], None],
        on_disconnect: Callable[[int], None] | None = None,
        on_span: Callable[[SpanEvent], None] | None = None,
        on_steps: Callable[[StepsEvent], None] | None = None,
    ) -> RegistrationServer:
        return cls(
            api.socket,
            api.socket_mode,
            api.max_message_bytes,
            api.max_messages_per_s,
            on_register=on_register,
            on_disconnect=on_disconnect,
            on_span=on_span,
            on_steps=on_steps,
        )

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the socket (and its directory), chmod it to ``mode``, and serve it on a daemon thread.

        Raises ``RegistrationSocketError`` when the path holds something other than a stale socket, or another
        process is listening on it.
        """
        if self._thread is not None:
            raise RuntimeError("RegistrationServer already started")
        path = self.socket_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistrationSocketError(f"{path.parent}: cannot create the socket's directory: {exc}") from None
        self._remove_stale(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            # chmod before listen(): until then nobody can connect, so there is no moment with the umask's mode.
            os.chmod(path, self.mode)
            st = os.stat(path)
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise RegistrationSocketError(f"{path}: cannot listen: {exc} (set api.socket to a writable path)") from None
        self._socket_inode = (st.st_dev, st.st_ino)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="wattmeter-registration", daemon=True)
        self._thread.start()
        log.info("registration socket listening on %s (mode %o)", path, self.mode)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close every connection (without disconnect events) and remove the socket file."""
        thread = self._thread
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("registration thread did not stop within %.1f s (a callback is stuck?)", timeout_s)
        else:
            self._close_all()
        self._remove_own_socket_file()
        if thread is None or not thread.is_alive():
            self._thread = None

    def __enter__(self) -> RegistrationServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _remove_stale(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RegistrationSocketError(f"{path}: {exc}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise RegistrationSocketError(f"{path}: exists and is not a socket; remove it or set api.socket elsewhere")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listening: a stale file from an agent that did not stop cleanly
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM):
                raise RegistrationSocketError(f"{path}: cannot tell whether another agent uses it: {exc}") from None
        else:
            raise RegistrationSocketError(f"{path}: another agent is already listening on it")
        finally:
            probe.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RegistrationSocketError(f"{path}: cannot remove the stale socket: {exc}") from None
        log.info("removed stale registration socket %s", path)

    def _remove_own_socket_file(self) -> None:
        """Unlink the socket only if it is still ours: a newer agent may have replaced it."""
        if self._socket_inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._socket_inode:
                os.unlink(self.socket_path)
        self._socket_inode = None

    # --- the serving thread ---------------------------------------------------------------------------------

    def _serve(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping.is_set():
                try:
                    ready = selector.select(timeout=None)
                except InterruptedError:
                    continue
                except Exception:
                    log.exception("registration: select failed")
                    time.sleep(0.1)
                    continue
                for key, _ in ready:
                    if self._stopping.is_set():
                        break
                    try:
                        self._dispatch(key)
                    except Exception:  # a bug must not end the thread: drop the one connection involved
                        log.exception("registration: unexpected error")
                        if isinstance(key.data, _Connection):
                            self._close(key.data)
        finally:
            self._close_all()

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        if key.fileobj is self._listener:
            self._accept()
        elif key.fileobj is self._wake_r:
            with contextlib.suppress(OSError):
                while self._wake_r is not None and self._wake_r.recv(4096):
                    pass
        else:
            self._read(cast(_Connection, key.data))

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None and self._selector is not None
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of file descriptors: the listener stays readable; back off rather than spin.
                    if not self._warned_fd_limit:
                        self._warned_fd_limit = True
                        log.warning("registration: cannot accept connections: %s", exc)
                    self._count("connection_limit")
                    time.sleep(0.05)
                return
            if len(self._connections) >= self.max_connections:
                self._count("connection_limit")
                sock.close()
                continue
            try:
                pid, uid, gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                )
                sock.setblocking(False)
            except OSError:
                self._count("peercred")
                sock.close()
                continue
            if pid <= 0:  # a pid namespace the agent cannot see into: nothing to attribute to
                self._count("peercred")
                sock.close()
                continue
            conn = _Connection(sock, pid, uid, gid, _TokenBucket(self.max_messages_per_s, time.monotonic()))
            self._connections[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        buffer = conn.buffer
        buffer += data
        now = time.monotonic()
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_message_bytes:
                self._count("oversize")
                self._close(conn)
                return
            line = bytes(buffer[start:end])
            start = end + 1
            if not conn.bucket.take(now):
                self._count("rate_limited")
                continue
            if not line.strip():
                continue
            if not self._handle(conn, line):
                return
        del buffer[:start]
        if len(buffer) > self.max_message_bytes:
            self._count("oversize")
            self._close(conn)

    def _handle(self, conn: _Connection, line: bytes) -> bool:
        """Act on one line; False when the connection was closed."""
        try:
            event = self._parse(conn, line)
        except _Refused as refused:
            self._count(refused.reason)
            if refused.span:
                self.spans_refused += 1
            if refused.steps:
                self.steps_refused += 1
            if refused.close:
                self._close(conn)
                return False
            return True
        self.accepted += 1
        if isinstance(event, SpanEvent):
            self.spans_accepted += 1
            if self._on_span is not None:
                self._call(self._on_span, event)
            return True
        if isinstance(event, StepsEvent):
            self.steps_accepted += 1
            if self._on_steps is not None:
                self._call(self._on_steps, event)
            return True
        conn.current = event
        self._call(self._on_register, event)
        return True

    def _parse(self, conn: _Connection, line: bytes) -> RegistrationEvent | SpanEvent | StepsEvent:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # ValueError covers bad UTF-8; RecursionError, deeply nested arrays
            raise _Refused("garbage") from None
        if not isinstance(message, dict):
            raise _Refused("garbage")
        version = message.get("v")
        kind = message.get("type")
        if not isinstance(version, int) or isinstance(version, bool) or not isinstance(kind, str):
            raise _Refused("garbage")
        if version != PROTOCOL_VERSION:
            raise _Refused("version", close=True)
        if kind == "register":
            return RegistrationEvent(
                pid=conn.pid,
                uid=conn.uid,
                gid=conn.gid,
                workload=_workload(message.get("workload")),
                phase=_phase(message.get("phase", "unknown")),
                job=_job(message.get("job", "")),
                labels=_labels(message.get("labels", {})),
                kind="register",
            )
        if kind == "phase":
            if conn.current is None:
                raise _Refused("not_registered")
            current = conn.current
            return RegistrationEvent(
                pid=conn.pid,
                uid=conn.uid,
                gid=conn.gid,
                workload=current.workload,
                phase=_phase(message.get("phase")),
                job=current.job,
                labels=current.labels,
                kind="phase",
            )
        if kind == "span":
            try:
                return _span(conn, message, time.time_ns())
            except _Refused as refused:
                refused.span = True
                raise
        if kind == "steps":
            count = message.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_STEPS:
                bad_count = _Refused("count")
                bad_count.steps = True
                raise bad_count
            return StepsEvent(pid=conn.pid, uid=conn.uid, gid=conn.gid, count=count, registration=conn.current)
        raise _Refused("unknown_type")

    def _close(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if fd < 0 or self._connections.get(fd) is not conn:
            return
        del self._connections[fd]
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        if conn.current is not None and self._on_disconnect is not None and not self._stopping.is_set():
            self._call(self._on_disconnect, conn.pid)

    def _close_all(self) -> None:
        for conn in list(self._connections.values()):
            self._close(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        if self._selector is not None:
            with contextlib.suppress(OSError):
                self._selector.close()

    def _count(self, reason: str) -> None:
        self.errors += 1
        self.error_counts[reason] += 1

    def _call(self, callback: Callable[..., None], argument: object) -> None:
        try:
            callback(argument)
        except Exception:
            self.callback_errors += 1
            if self.callback_errors == 1:
                log.exception("registration callback failed (later failures are logged at debug level)")
            else:
                log.debug("registration callback failed", exc_info=True)


def _workload(value: object) -> str:
    if not isinstance(value, str):
        raise _Refused("workload")
    name = value.strip()
    if not _WORKLOAD.fullmatch(name):
        raise _Refused("workload")
    return name


def _phase(value: object) -> PhaseName:
    if value not in PHASES:
        raise _Refused("phase")
    return cast(PhaseName, value)


def _job(value: object) -> str:
    if not isinstance(value, str) or len(value.strip()) > MAX_JOB_CHARS or _SURROGATES.search(value):
        raise _Refused("field")
    return value.strip()


def _labels(value: object) -> dict[str, str]:
    """At most ``MAX_LABELS`` labels, named like Prometheus labels, values up to ``MAX_LABEL_VALUE_CHARS``: they
    are exported (``wattmeter_workload_label_info``), so what one client sends must stay small."""
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        raise _Refused("field")
    for key, text in value.items():
        if not isinstance(key, str) or not _LABEL_NAME.fullmatch(key):
            raise _Refused("field")
        if not isinstance(text, str) or len(text) > MAX_LABEL_VALUE_CHARS or _SURROGATES.search(text):
            raise _Refused("field")
    return dict(value)


def _span(conn: _Connection, message: Mapping[str, object], now_ns: int) -> SpanEvent:
    request_id = message.get("request_id")
    if (
        not isinstance(request_id, str)
        or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS
        or _CONTROL_CHARS.search(request_id)
        or _SURROGATES.search(request_id)
    ):
        raise _Refused("request_id")
    start_ns = _time_ns(message.get("start_ns"), required=True)
    end_ns = _time_ns(message.get("end_ns"), required=True)
    if not MIN_SPAN_TIME_NS <= start_ns <= end_ns <= now_ns + MAX_SPAN_FUTURE_NS:
        raise _Refused("time")
    if end_ns - start_ns > MAX_SPAN_NS or start_ns < now_ns - MAX_SPAN_AGE_NS:
        raise _Refused("time")
    queue_end_ns = _time_ns(message.get("queue_end_ns", 0))
    prefill_end_ns = _time_ns(message.get("prefill_end_ns", 0))
    for boundary in (queue_end_ns, prefill_end_ns):
        if boundary and not start_ns <= boundary <= end_ns:
            raise _Refused("time")
    if queue_end_ns and prefill_end_ns and prefill_end_ns < queue_end_ns:
        raise _Refused("time")  # prefill runs after the queue
    workload = message.get("workload", "")
    span_id = message.get("span_id", "")
    if not isinstance(span_id, str) or not _SPAN_ID.fullmatch(span_id):
        raise _Refused("span_id")
    return SpanEvent(
        pid=conn.pid,
        uid=conn.uid,
        gid=conn.gid,
        request_id=request_id,
        start_ns=start_ns,
        end_ns=end_ns,
        model=_bounded_text(message.get("model", ""), MAX_MODEL_CHARS),
        tenant=_bounded_text(message.get("tenant", ""), MAX_TENANT_CHARS),
        workload="" if workload == "" else _workload(workload),
        labels=_labels(message.get("labels", {})),
        input_tokens=_tokens(message.get("input_tokens", 0)),
        output_tokens=_tokens(message.get("output_tokens", 0)),
        prefill_end_ns=prefill_end_ns,
        queue_end_ns=queue_end_ns,
        span_id=span_id,
    )


def _time_ns(value: object, required: bool = False) -> int:
    """A time in Unix ns: an int (never a float: 2**53 ns is only 104 days), 0 for "not reported" unless required."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Refused("time")
    if value == 0 and not required:
        return 0
    if value < MIN_SPAN_TIME_NS:
        raise _Refused("time")
    return value


def _bounded_text(value: object, max_chars: int) -> str:
    if not isinstance(value, str) or len(value) > max_chars or _SURROGATES.search(value):
        raise _Refused("field")
    return value


def _tokens(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOKENS:
        raise _Refused("field")
    return value
