"""Runs every source on its own schedule and keeps the latest state for the exporters.

One read thread per interval, shared by the sources with that interval (``ReadGroup``), and one more per source
for its slow status reads, each on monotonic deadlines ``start + k * interval``: a slow read skips the ticks it
overran instead of shifting the schedule. A read that hangs past ``read_timeout_s`` marks its source down
(``check_timeouts``), and the other sources of its group move to a thread of their own.
Nothing a source does can end its thread: every failure is counted and the loop goes on.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from collector.errors import SourceError
from collector.readings import DeviceInfo, DeviceReading, DeviceStatus
from collector.sources.base import Source

log = logging.getLogger(__name__)

READ_DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OPEN_RETRY_MIN_S = 1.0
OPEN_RETRY_MAX_S = 60.0

ReadingsListener = Callable[[str, Sequence[DeviceReading]], None]


def run_every(interval_s: float, tick: Callable[[], None], stopped: threading.Event) -> None:
    """Call ``tick`` at ``start + k * interval_s`` (monotonic) until ``stopped`` is set; ``tick`` must not raise.

    A tick that overruns skips the missed deadlines and keeps the phase: no drift, and no burst to catch up.
    """
    interval_ns = int(interval_s * 1e9)
    deadline = time.monotonic_ns()
    while not stopped.is_set():
        tick()
        deadline += interval_ns
        now = time.monotonic_ns()
        if deadline <= now:
            deadline += ((now - deadline) // interval_ns + 1) * interval_ns
        if stopped.wait((deadline - now) / 1e9):
            return


@dataclass
class DurationHistogram:
    """Cumulative-bucket histogram of read durations in seconds (exported as a Prometheus histogram)."""

    bounds: tuple[float, ...] = READ_DURATION_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(READ_DURATION_BUCKETS_S) + 1))
    sum_s: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        running = 0
        out = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class SourceState:
    """What the sampler knows about one source; read by exporters without locks (fields are replaced whole)."""

    source: Source
    opened: bool = False
    up: bool = False
    hung: bool = False
    last_error: str = ""
    errors_total: int = 0
    devices: tuple[DeviceInfo, ...] = ()
    readings: dict[str, DeviceReading] = field(default_factory=dict)
    device_up: dict[str, bool] = field(default_factory=dict)
    all_up: bool = False  # every device answered the last read
    device_errors: frozenset[str] = frozenset()
    statuses: dict[str, DeviceStatus] = field(default_factory=dict)
    read_durations: DurationHistogram = field(default_factory=DurationHistogram)
    read_started_mono: float | None = None
    phase_offset_s: float = 0.0
    stopped: threading.Event = field(default_factory=threading.Event)  # set on sampler stop or retire
    ready: threading.Event = field(default_factory=threading.Event)  # set once the source is open

    @property
    def name(self) -> str:
        return self.source.name


class ReadGroup:
    """Sources with the same interval, read one after the other on one thread.

    Each thread that wakes costs CPU of its own (about 0.2 ms a wake on a small VM, more than a RAPL or NVML read),
    so sources that share an interval share the wake. A read that hangs would hold up the others of its group:
    when the watchdog finds one (``Sampler.check_timeouts``), the others move to a new group and thread, and the
    hung source keeps the old one to itself (``isolated``, so nothing joins it again).
    """

    __slots__ = ("closed", "interval_s", "isolated", "states", "stopped")

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.states: list[SourceState] = []
        self.stopped = threading.Event()
        self.isolated = False
        self.closed = False  # its thread has ended (no source left): nothing may join it


class Sampler:
    def __init__(self, sources: Sequence[Source], read_timeout_s: float = 2.0) -> None:
        self.states = [SourceState(source) for source in sources]
        self.read_timeout_s = read_timeout_s
        self.version = 0  # bumped on every change an exporter can see
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._listeners: list[ReadingsListener] = []
        self._lock = threading.Lock()
        self._groups: list[ReadGroup] = []

    def add_listener(self, listener: ReadingsListener) -> None:
        """Call ``listener(source_name, readings)`` after every successful read, on the source's thread."""
        self._listeners.append(listener)

    def mark_opened(self, state: SourceState) -> None:
        state.devices = tuple(state.source.devices())
        state.all_up = False  # device_up is rebuilt for these devices at the next read
        state.opened = True
        state.ready.set()

    def mark_failed_open(self, state: SourceState, message: str) -> None:
        """Record an open that failed before the sampler started (already logged); the sampler retries it."""
        self._count_errors(state, 1)
        state.last_error = message

    def start(self) -> None:
        intervals = sorted({state.source.interval_s for state in self.states})
        for state in self.states:
            # spread the groups' first reads over half an interval, so their threads do not wake together
            # and contend for the GIL on every tick
            index = intervals.index(state.source.interval_s)
            state.phase_offset_s = index / len(intervals) * state.source.interval_s / 2
            self._spawn(f"read-{state.name}", self._read_loop, state)
            if state.source.slow_interval_s is not None:
                self._spawn(f"status-{state.name}", self._status_loop, state)

    def _spawn(self, name: str, target: Callable[[Any], None], argument: object) -> None:
        # daemon: a read hung inside a driver must not keep the process alive at shutdown
        thread = threading.Thread(target=target, args=(argument,), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def signal_stop(self) -> None:
        """Ask every loop to end; returns at once (``stop`` also waits)."""
        self._stopping = True
        for state in self.states:
            state.stopped.set()
        with self._lock:
            for group in self._groups:
                group.stopped.set()

    def stop(self, timeout_s: float = 1.0) -> None:
        self.signal_stop()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def stopping(self) -> bool:
        return self._stopping

    def retire(self, name: str) -> None:
        """Stop sampling a source and drop its series (a stand-in whose real source came up)."""
        for state in self.states:
            if state.name == name:
                state.stopped.set()
        self.states = [state for state in self.states if state.name != name]
        self._bump()

    def _bump(self) -> None:
        with self._lock:
            self.version += 1

    def _count_errors(self, state: SourceState, count: int) -> None:
        with self._lock:  # the read, status and watchdog threads all count
            state.errors_total += count
            self.version += 1

    def _fail(self, state: SourceState, message: str) -> None:
        state.up = False
        if message != state.last_error:
            log.error("source %s: %s", state.name, message)
        state.last_error = message
        self._count_errors(state, 1)

    def _open(self, state: SourceState) -> bool:
        try:
            state.source.open()
            self.mark_opened(state)
        except SourceError as exc:
            self._fail(state, str(exc))
            return False
        except Exception as exc:
            if f"{type(exc).__name__}: {exc}" != state.last_error:
                log.exception("source %s failed to open", state.name)
            self._fail(state, f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _read_loop(self, state: SourceState) -> None:
        retry_s = OPEN_RETRY_MIN_S
        while not state.opened and not state.stopped.is_set():
            if self._open(state):
                break
            state.stopped.wait(retry_s)
            retry_s = min(retry_s * 2, OPEN_RETRY_MAX_S)
        group = self._join_group(state)
        if group is None:
            return  # read by the thread of the group it joined
        if state.stopped.wait(state.phase_offset_s):
            return
        self._run_group(group)

    def _join_group(self, state: SourceState) -> ReadGroup | None:
        """Add an opened source to the group of its interval; returns a new group for the caller to run, or None
        when an existing group's thread reads it from now on."""
        with self._lock:
            if self._stopping:
                return None
            for group in self._groups:
                if group.interval_s == state.source.interval_s and not group.isolated and not group.closed:
                    group.states.append(state)
                    return None
            group = ReadGroup(state.source.interval_s)
            group.states.append(state)
            self._groups.append(group)
            return group

    def _run_group(self, group: ReadGroup) -> None:
        run_every(group.interval_s, lambda: self._read_group(group), group.stopped)

    def _read_group(self, group: ReadGroup) -> None:
        retired = False
        for state in tuple(group.states):
            if state.stopped.is_set():
                retired = True
            elif state in group.states:  # not moved off by the watchdog meanwhile
                self._guarded(state, self._read_once)
        if not retired:
            return
        with self._lock:
            group.states = [state for state in group.states if not state.stopped.is_set()]
            if not group.states:
                group.closed = True
                group.stopped.set()
                self._groups.remove(group)

    def _status_loop(self, state: SourceState) -> None:
        while not state.ready.wait(1.0):
            if state.stopped.is_set():
                return
        slow_interval_s = state.source.slow_interval_s
        if slow_interval_s is not None:
            self._every(state, slow_interval_s, self._status_once)

    def _every(self, state: SourceState, interval_s: float, tick: Callable[[SourceState], None]) -> None:
        run_every(interval_s, lambda: self._guarded(state, tick), state.stopped)

    def _guarded(self, state: SourceState, tick: Callable[[SourceState], None]) -> None:
        try:
            tick(state)
        except Exception as exc:  # a bug in a source or listener must not end the loop
            message = f"{type(exc).__name__}: {exc}"
            if message != state.last_error:
                log.exception("source %s: unexpected error", state.name)
            self._fail(state, message)

    def _read_once(self, state: SourceState) -> None:
        started = time.perf_counter()
        state.read_started_mono = time.monotonic()
        failure = ""
        try:
            readings = state.source.read()
        except SourceError as exc:
            failure = str(exc)
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            if failure != state.last_error:
                log.exception("source %s: unexpected error", state.name)
        finally:
            state.read_started_mono = None
            state.read_durations.observe(time.perf_counter() - started)
        if failure:
            self._fail(state, failure)  # after the duration is recorded, so one render sees both
            return
        errors = state.source.device_errors()
        new_errors = 0
        if errors or state.device_errors:
            device_errors = frozenset(errors)
            new_errors = len(device_errors - state.device_errors)  # each device failure once, not once per read
            state.device_errors = device_errors
        merged = dict(state.readings)
        for reading in readings:
            merged[reading.device_id] = reading
        state.readings = merged
        # rebuilt only when it changes: every device answered this read and the last (the usual case) keeps it
        if not (state.all_up and len(readings) == len(state.devices)):
            answered = {reading.device_id for reading in readings}
            state.device_up = {info.device_id: info.device_id in answered for info in state.devices}
            state.all_up = len(answered) == len(state.devices) and all(state.device_up.values())
        if state.hung or not state.up:
            log.info("source %s is up", state.name)
        state.up, state.hung, state.last_error = True, False, ""
        for listener in self._listeners:  # before the bump, so the next render sees what they derived too
            try:
                listener(state.name, readings)
            except Exception:
                log.exception("readings listener failed for source %s", state.name)
        if new_errors:
            self._count_errors(state, new_errors)
        else:
            self._bump()

    def _status_once(self, state: SourceState) -> None:
        try:
            statuses = state.source.read_status()
        except Exception as exc:
            log.warning("source %s: status read failed: %s", state.name, exc)
            self._count_errors(state, 1)
            return
        state.statuses = {status.device_id: status for status in statuses}
        self._bump()

    def check_timeouts(self, now: float | None = None) -> list[str]:
        """Mark sources whose read has run past ``read_timeout_s`` as down, and move the other sources of their
        group to a thread of their own; returns the hung sources' names."""
        now = time.monotonic() if now is None else now
        hung = []
        for state in self.states:
            started = state.read_started_mono
            if started is not None and now - started > self.read_timeout_s and not state.hung:
                state.hung = True
                self._fail(state, f"read has not returned after {self.read_timeout_s:g} s (hung driver?)")
                hung.append(state.name)
                self._isolate(state)
        return hung

    def _isolate(self, state: SourceState) -> None:
        with self._lock:
            group = next((g for g in self._groups if state in g.states), None)
            if group is None or self._stopping:
                return
            group.isolated = True
            others = [other for other in group.states if other is not state]
            group.states = [state]
            if not others:
                return
            rescued = ReadGroup(group.interval_s)
            rescued.states = others
            self._groups.append(rescued)
        log.warning(
            "source %s hung: %s read on their own thread from now on", state.name, ", ".join(o.name for o in others)
        )
        self._spawn(f"read-{others[0].name}", self._run_group, rescued)

    def any_up(self) -> bool:
        return any(state.up for state in self.states)
