from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from collector.errors import SourceError
from collector.readings import DeviceInfo, DeviceKind, DeviceReading
from collector.sampler import DurationHistogram, Sampler
from collector.sources.base import Source


class CountingSource(Source):
    """Reads one device; optional per-read delay, failure, or hang."""

    def __init__(self, name: str, interval_s: float = 0.02, delay_s: float = 0.0) -> None:
        self.name = name  # type: ignore[misc]
        self.interval_s = interval_s
        self.delay_s = delay_s
        self.read_times: list[float] = []
        self.fail = False
        self.hang = threading.Event()
        self.release = threading.Event()
        self.energy = 0.0

    def devices(self) -> Sequence[DeviceInfo]:
        return [DeviceInfo(f"{self.name}0", DeviceKind.CPU, self.name, "v", "m", 0, package="0", domain="package")]

    def read(self) -> Sequence[DeviceReading]:
        self.read_times.append(time.monotonic())
        if self.hang.is_set():
            self.release.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise SourceError("sensor on fire")
        self.energy += 1.0
        return [DeviceReading(f"{self.name}0", self.energy, 10.0, time.monotonic_ns(), time.time_ns())]


def started(*sources: Source, timeout_s: float = 0.3) -> Sampler:
    sampler = Sampler(list(sources), read_timeout_s=timeout_s)
    for state in sampler.states:
        sampler.mark_opened(state)
    sampler.start()
    return sampler


def wait_for(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_schedule_does_not_drift_when_reads_are_slow() -> None:
    # each read takes 30% of the interval: a sleep-after-read loop would drift by 30% per tick
    source = CountingSource("slow", interval_s=0.05, delay_s=0.015)
    sampler = started(source)
    try:
        wait_for(lambda: len(source.read_times) >= 21)
    finally:
        sampler.stop()
    times = source.read_times[:21]
    span = times[-1] - times[0]
    assert abs(span - 20 * 0.05) < 0.05, span  # well under the 0.3 s a drifting loop would add


def test_overrun_skips_ticks_instead_of_bursting() -> None:
    source = CountingSource("overrun", interval_s=0.02, delay_s=0.05)
    sampler = started(source)
    try:
        wait_for(lambda: len(source.read_times) >= 6)
    finally:
        sampler.stop()
    gaps = [b - a for a, b in zip(source.read_times[:5], source.read_times[1:6], strict=True)]
    assert min(gaps) >= 0.05  # never two reads back to back to "catch up"


def test_a_failing_source_does_not_stop_the_others() -> None:
    good, bad = CountingSource("good"), CountingSource("bad")
    bad.fail = True
    sampler = started(good, bad)
    try:
        good_state, bad_state = sampler.states
        # a failed read is counted on the read thread after the source returned (raised)
        wait_for(lambda: len(good.read_times) >= 5 and bad_state.errors_total >= 5)
        assert good_state.up and not bad_state.up
        assert "on fire" in bad_state.last_error
        bad.fail = False
        wait_for(lambda: bad_state.up and bad_state.last_error == "")  # up is set just before the error is cleared
    finally:
        sampler.stop()


def test_a_hung_source_is_marked_down_and_the_others_go_on() -> None:
    good, stuck = CountingSource("good"), CountingSource("stuck")
    stuck.hang.set()
    sampler = started(good, stuck, timeout_s=0.1)
    try:
        wait_for(lambda: len(stuck.read_times) == 1)
        time.sleep(0.2)
        assert sampler.check_timeouts() == ["stuck"]
        assert sampler.check_timeouts() == []  # counted once per hang
        stuck_state = sampler.states[1]
        assert not stuck_state.up and stuck_state.hung and stuck_state.errors_total == 1
        # the two shared a thread; the watchdog moved the good one to a thread of its own, where it goes on
        reads_after_watchdog = len(good.read_times)
        wait_for(lambda: len(good.read_times) > reads_after_watchdog + 3)
        assert sampler.states[0].up
        stuck.hang.clear()
        stuck.release.set()
        wait_for(lambda: stuck_state.up and len(stuck.read_times) >= 3)
        # released, the hung source keeps its thread to itself
        groups = {tuple(s.name for s in g.states): g.isolated for g in sampler._groups}
        assert groups == {("stuck",): True, ("good",): False}
    finally:
        stuck.release.set()
        sampler.stop()


def test_listeners_get_readings_and_a_raising_listener_is_contained() -> None:
    source = CountingSource("l")
    sampler = Sampler([source])
    sampler.mark_opened(sampler.states[0])
    got: list[tuple[str, float]] = []

    def broken(name: str, readings: Sequence[DeviceReading]) -> None:
        raise RuntimeError("listener bug")

    sampler.add_listener(broken)
    sampler.add_listener(lambda name, readings: got.extend((name, r.energy_j) for r in readings))
    sampler.start()
    try:
        wait_for(lambda: len(got) >= 3)
    finally:
        sampler.stop()
    assert got[:3] == [("l", 1.0), ("l", 2.0), ("l", 3.0)]


class FailingOpen(CountingSource):
    def __init__(self) -> None:
        super().__init__("flaky")
        self.opens = 0

    def open(self) -> None:
        self.opens += 1
        if self.opens < 2:
            raise SourceError("not yet")


def test_source_failing_to_open_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("collector.sampler.OPEN_RETRY_MIN_S", 0.05)
    source = FailingOpen()
    sampler = Sampler([source])
    sampler.start()
    try:
        wait_for(lambda: sampler.states[0].up)
    finally:
        sampler.stop()
    assert source.opens == 2
    assert sampler.states[0].errors_total >= 1


def test_stop_returns_quickly_even_with_long_intervals() -> None:
    source = CountingSource("long", interval_s=30.0)
    sampler = started(source)
    wait_for(lambda: len(source.read_times) == 1)
    begun = time.monotonic()
    sampler.stop()
    assert time.monotonic() - begun < 0.5


def test_histogram_buckets_are_cumulative() -> None:
    histogram = DurationHistogram()
    for seconds in (0.0001, 0.003, 0.003, 5.0):
        histogram.observe(seconds)
    buckets = dict(histogram.cumulative())
    assert buckets["0.0005"] == 1 and buckets["0.005"] == 3 and buckets["2.5"] == 3 and buckets["+Inf"] == 4
    assert histogram.count == 4 and abs(histogram.sum_s - 5.0061) < 1e-9


class BrokenDeviceErrors(CountingSource):
    def device_errors(self) -> dict[str, str]:
        raise RuntimeError("bug in device_errors")


def test_a_bug_outside_read_does_not_end_the_loop() -> None:
    source = BrokenDeviceErrors("buggy")
    sampler = started(source)
    try:
        wait_for(lambda: len(source.read_times) >= 4)  # the thread lives on after the first failure
        state = sampler.states[0]
        assert not state.up and "bug in device_errors" in state.last_error
        assert state.errors_total >= 3
    finally:
        sampler.stop()


class FlappingDevices(CountingSource):
    def __init__(self) -> None:
        super().__init__("flap")
        self.errors: dict[str, str] = {}

    def device_errors(self) -> dict[str, str]:
        return dict(self.errors)


def test_a_down_device_is_counted_once_not_once_per_read() -> None:
    source = FlappingDevices()
    sampler = Sampler([source])
    state = sampler.states[0]
    sampler.mark_opened(state)
    source.errors = {"gpu3": "lost"}
    for _ in range(5):
        sampler._read_once(state)
    assert state.errors_total == 1
    source.errors = {"gpu3": "lost", "gpu4": "lost"}
    sampler._read_once(state)
    assert state.errors_total == 2
    source.errors = {}
    sampler._read_once(state)
    source.errors = {"gpu3": "lost again"}
    sampler._read_once(state)
    assert state.errors_total == 3


def test_retire_stops_the_loop_and_drops_the_source() -> None:
    keep, retired = CountingSource("keep"), CountingSource("old")
    sampler = started(keep, retired)
    try:
        wait_for(lambda: len(retired.read_times) >= 2)
        sampler.retire("old")
        count = len(retired.read_times)
        time.sleep(0.15)
        assert len(retired.read_times) <= count + 1  # at most one read already under way
        assert [state.name for state in sampler.states] == ["keep"]
        assert len(keep.read_times) > 5
    finally:
        sampler.stop()


def test_sources_with_one_interval_share_a_thread_and_others_get_their_own() -> None:
    first, second, slower = CountingSource("first"), CountingSource("second"), CountingSource("slower", 0.05)
    threads_before = threading.active_count()
    sampler = started(first, second, slower)
    try:
        wait_for(lambda: all(len(s.read_times) >= 3 for s in (first, second, slower)))
        # one read thread per interval; the start-up threads of the sources that joined a group have ended
        wait_for(lambda: threading.active_count() - threads_before == 2)
        groups = sorted(sampler._groups, key=lambda g: g.interval_s)
        assert [sorted(s.name for s in g.states) for g in groups] == [["first", "second"], ["slower"]]
    finally:
        sampler.stop()


def test_a_source_opened_later_joins_the_group_of_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    early, late = CountingSource("early"), CountingSource("late")
    sampler = Sampler([early, late], read_timeout_s=1.0)
    sampler.mark_opened(sampler.states[0])  # "late" is opened by its thread, with the sampler's retry
    sampler.start()
    try:
        wait_for(lambda: len(early.read_times) >= 2 and len(late.read_times) >= 2)
        assert [sorted(s.name for s in g.states) for g in sampler._groups] == [["early", "late"]]
    finally:
        sampler.stop()
