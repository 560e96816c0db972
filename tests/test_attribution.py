from __future__ import annotations

import math
import pickle
from collections.abc import Hashable, Sequence
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.attribution import (
    IDLE,
    OTHER,
    SYSTEM,
    DeviceSplitter,
    ProcessShare,
    SpecialKey,
    WorkloadEnergy,
    gpu_process_shares,
    split_cpu_interval,
    split_gpu_interval,
)
from collector.readings import DeviceKind, DeviceReading, GpuProcess

GIB = 1 << 30


def reading(device_id: str, energy_j: float, t_s: float = 0.0) -> DeviceReading:
    return DeviceReading(device_id, energy_j, None, int(t_s * 1e9), int(t_s * 1e9))


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --- GPU rule ------------------------------------------------------------------------------------------------------


def test_gpu_no_process_is_all_idle() -> None:
    assert split_gpu_interval(12.5, []) == ({}, 12.5)


def test_gpu_one_process_gets_all_whatever_its_utilisation() -> None:
    assert split_gpu_interval(10.0, [ProcessShare("a", 0.2, GIB)]) == ({"a": 10.0}, 0.0)
    assert split_gpu_interval(10.0, [ProcessShare("a", 0.0, None)]) == ({"a": 10.0}, 0.0)


def test_gpu_processes_of_one_key_add_up_to_all() -> None:
    shares, idle = split_gpu_interval(9.0, [ProcessShare("a", 0.1), ProcessShare("a", 0.5)])
    assert shares == {"a": 9.0}
    assert idle == 0.0


def test_gpu_split_by_utilisation() -> None:
    procs = [ProcessShare("a", 0.6, GIB), ProcessShare("b", 0.2, 3 * GIB)]
    shares, idle = split_gpu_interval(100.0, procs)
    assert shares == pytest.approx({"a": 75.0, "b": 25.0})
    assert idle == 0.0


def test_gpu_same_key_processes_add_up_in_a_split() -> None:
    procs = [ProcessShare("a", 0.1), ProcessShare("b", 0.2), ProcessShare("a", 0.1)]
    shares, _ = split_gpu_interval(40.0, procs)
    assert shares == pytest.approx({"a": 20.0, "b": 20.0})


def test_gpu_falls_back_to_memory_when_a_utilisation_is_missing() -> None:
    procs = [ProcessShare("a", 0.9, 3 * GIB), ProcessShare("b", None, 1 * GIB)]
    shares, _ = split_gpu_interval(100.0, procs)
    assert shares == pytest.approx({"a": 75.0, "b": 25.0})


def test_gpu_falls_back_to_memory_when_utilisation_sums_to_zero() -> None:
    procs = [ProcessShare("a", 0.0, 1 * GIB), ProcessShare("b", 0.0, 4 * GIB)]
    shares, _ = split_gpu_interval(50.0, procs)
    assert shares == pytest.approx({"a": 10.0, "b": 40.0})


def test_gpu_non_finite_utilisation_counts_as_missing() -> None:
    procs = [ProcessShare("a", math.nan, 1 * GIB), ProcessShare("b", 0.5, 1 * GIB)]
    shares, _ = split_gpu_interval(50.0, procs)
    assert shares == pytest.approx({"a": 25.0, "b": 25.0})


def test_gpu_equal_split_per_process_when_nothing_is_reported() -> None:
    procs = [ProcessShare("a"), ProcessShare("b", 0.7, None), ProcessShare("a", None, 2 * GIB)]
    shares, idle = split_gpu_interval(30.0, procs)
    assert shares == pytest.approx({"a": 20.0, "b": 10.0})
    assert idle == 0.0


def test_gpu_subnormal_utilisations_do_not_overflow() -> None:
    shares, _ = split_gpu_interval(2.0, [ProcessShare("a", 1e-308), ProcessShare("b", 0.0)])
    assert shares == {"a": 2.0, "b": 0.0}


def test_gpu_equal_split_when_memory_sums_to_zero() -> None:
    shares, _ = split_gpu_interval(8.0, [ProcessShare("a", None, 0), ProcessShare("b", None, 0)])
    assert shares == pytest.approx({"a": 4.0, "b": 4.0})


@pytest.mark.parametrize("energy", [-1.0, math.nan, math.inf])
def test_gpu_bad_energy_is_refused(energy: float) -> None:
    with pytest.raises(ValueError):
        split_gpu_interval(energy, [ProcessShare("a")])


def test_gpu_process_shares_from_nvml_processes() -> None:
    processes = (GpuProcess(pid=7, used_memory_bytes=GIB, sm_utilization_ratio=0.4, workload="train"),)
    assert gpu_process_shares(processes, lambda p: p.workload) == [ProcessShare("train", 0.4, GIB)]


# --- CPU rule ------------------------------------------------------------------------------------------------------


def test_cpu_remainder_goes_to_system() -> None:
    shares, system = split_cpu_interval(100.0, {"a": 30.0, "b": 20.0}, 100.0)
    assert shares == pytest.approx({"a": 30.0, "b": 20.0})
    assert system == pytest.approx(50.0)


def test_cpu_over_count_is_scaled_down_to_the_energy() -> None:
    shares, system = split_cpu_interval(90.0, {"a": 80.0, "b": 40.0}, 100.0)
    assert shares == pytest.approx({"a": 60.0, "b": 30.0})
    assert system == 0.0
    assert sum(shares.values()) == pytest.approx(90.0)


@pytest.mark.parametrize("total", [0.0, -5.0])
def test_cpu_no_total_is_all_system(total: float) -> None:
    shares, system = split_cpu_interval(7.0, {"a": 3.0}, total)
    assert shares == {"a": 0.0}
    assert system == 7.0


def test_cpu_no_keys_is_all_system() -> None:
    assert split_cpu_interval(7.0, {}, 100.0) == ({}, 7.0)


def test_cpu_negative_ticks_count_as_zero() -> None:
    shares, system = split_cpu_interval(10.0, {"a": -4.0, "b": 5.0}, 10.0)
    assert shares == pytest.approx({"a": 0.0, "b": 5.0})
    assert system == pytest.approx(5.0)


def test_cpu_bad_values_are_refused() -> None:
    with pytest.raises(ValueError):
        split_cpu_interval(-1.0, {"a": 1.0}, 2.0)
    with pytest.raises(ValueError):
        split_cpu_interval(1.0, {"a": math.nan}, 2.0)
    with pytest.raises(ValueError):
        split_cpu_interval(1.0, {"a": 1.0}, math.inf)


# --- DeviceSplitter ------------------------------------------------------------------------------------------------


def test_splitter_first_reading_is_only_a_baseline() -> None:
    splitter: DeviceSplitter[str] = DeviceSplitter()
    splitter.set_gpu_shares("gpu0", [ProcessShare("a")])
    assert splitter.on_reading(reading("gpu0", 1000.0)) == {}
    assert splitter.on_reading(reading("gpu0", 1010.0)) == {"a": 10.0, IDLE: 0.0}


def test_splitter_without_shares_gives_idle_or_system() -> None:
    splitter: DeviceSplitter[str] = DeviceSplitter()
    splitter.add_device("cpu0", DeviceKind.CPU)
    splitter.add_device("dram0", DeviceKind.DRAM)
    for device in ("gpu0", "cpu0", "dram0"):
        splitter.on_reading(reading(device, 5.0))
    assert splitter.on_reading(reading("gpu0", 8.0)) == {IDLE: 3.0}
    assert splitter.on_reading(reading("cpu0", 9.0)) == {SYSTEM: 4.0}
    assert splitter.on_reading(reading("dram0", 6.0)) == {SYSTEM: 1.0}


def test_splitter_shares_hold_until_the_next_scan() -> None:
    splitter: DeviceSplitter[str] = DeviceSplitter()
    splitter.set_cpu_shares("cpu0", {"a": 25.0}, 100.0)
    splitter.on_reading(reading("cpu0", 0.0))
    assert splitter.on_reading(reading("cpu0", 4.0)) == pytest.approx({"a": 1.0, SYSTEM: 3.0})
    assert splitter.on_reading(reading("cpu0", 8.0)) == pytest.approx({"a": 1.0, SYSTEM: 3.0})
    splitter.set_cpu_shares("cpu0", {"b": 50.0}, 100.0)
    assert splitter.on_reading(reading("cpu0", 12.0)) == pytest.approx({"b": 2.0, SYSTEM: 2.0})


def test_splitter_never_gives_negative_joules() -> None:
    splitter: DeviceSplitter[str] = DeviceSplitter()
    splitter.set_gpu_shares("gpu0", [ProcessShare("a")])
    splitter.on_reading(reading("gpu0", 100.0))
    assert splitter.on_reading(reading("gpu0", 90.0)) == {"a": 0.0, IDLE: 0.0}  # taken as a new baseline
    assert splitter.on_reading(reading("gpu0", 95.0)) == {"a": 5.0, IDLE: 0.0}


def test_splitter_ignores_non_finite_energy() -> None:
    splitter: DeviceSplitter[str] = DeviceSplitter()
    splitter.on_reading(reading("gpu0", 100.0))
    assert splitter.on_reading(reading("gpu0", math.nan)) == {}
    assert splitter.on_reading(reading("gpu0", 101.0)) == {IDLE: 1.0}


def test_special_keys_are_not_workload_names() -> None:
    keys: set[Hashable] = {IDLE, "idle", SYSTEM, "system", OTHER, "other"}
    assert len(keys) == 6
    assert str(IDLE) == "idle"
    assert str(SYSTEM) == "system"
    assert str(OTHER) == "other"
    assert SpecialKey("idle") == IDLE
    assert SpecialKey("idle") is IDLE and pickle.loads(pickle.dumps(OTHER)) is OTHER  # interned, also unpickled
    with pytest.raises(AttributeError):
        IDLE.name = "busy"  # type: ignore[misc]


# --- WorkloadEnergy ------------------------------------------------------------------------------------------------


def rows_by_series(rows: Sequence[tuple[Hashable, str, float, float]]) -> dict[tuple[Hashable, str], float]:
    return {(key, device): joules for key, device, joules, _ in rows}


def test_energy_accumulates_per_key_and_device() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=10, retain_s=60.0, power_window_s=1.0)
    energy.add("a", "gpu0", 2.0, 0.0)
    energy.add("a", "gpu0", 3.0, 0.5)
    energy.add("a", "cpu0", 1.0, 0.5)
    energy.add(IDLE, "gpu0", 4.0, 0.5)
    assert rows_by_series(energy.snapshot(1.0)) == {("a", "gpu0"): 5.0, ("a", "cpu0"): 1.0, (IDLE, "gpu0"): 4.0}
    assert energy.last_seen_s("a") == 0.5
    assert energy.last_seen_s("b") is None
    assert energy.series_count == 3


def test_power_is_joules_in_the_last_window_over_the_window() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=10, retain_s=60.0, power_window_s=1.0)
    for i in range(1, 31):  # 1 J every 0.1 s: 10 W
        energy.add("a", "gpu0", 1.0, i / 10)
    [(_, _, joules, power_w)] = energy.snapshot(3.0)
    assert joules == 30.0
    assert power_w == pytest.approx(10.0)
    # energy is known up to the device's latest increment: the window ends there, not at the snapshot
    [(_, _, joules, power_w)] = energy.snapshot(3.55)
    assert joules == 30.0
    assert power_w == pytest.approx(10.0)
    [(_, _, _, power_w)] = energy.snapshot(4.5)  # nothing for a whole window: it ends at the snapshot
    assert power_w == 0.0
    [(_, _, _, power_w)] = energy.snapshot(10.0)
    assert power_w == 0.0


def test_the_window_ends_at_each_device_s_latest_increment() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=10, retain_s=60.0, power_window_s=1.0)
    energy.add_many("gpu0", {"a": 10.0, "b": 0.0}, now_s=5.0, since_s=4.0)  # b idle on gpu0
    energy.add_many("gpu1", {"b": 30.0}, now_s=5.9, since_s=4.9)
    power = {(key, device): watts for key, device, _, watts in energy.snapshot(5.95)}
    assert power == {("a", "gpu0"): pytest.approx(10.0), ("b", "gpu0"): 0.0, ("b", "gpu1"): pytest.approx(30.0)}


def test_an_increment_over_an_interval_counts_for_its_part_inside_the_window() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=10, retain_s=60.0, power_window_s=1.0)
    energy.add_many("gpu0", {"a": 40.0}, now_s=2.0, since_s=0.0)  # 20 W over (0, 2]
    energy.add_many("gpu0", {"a": 10.0}, now_s=2.5, since_s=2.0)  # 20 W over (2, 2.5]
    [(_, _, joules, power_w)] = energy.snapshot(2.5)
    assert joules == 50.0
    assert power_w == pytest.approx(20.0)  # 10 J of the first (1.5 .. 2) and all of the second
    [(_, _, _, power_w)] = energy.snapshot(2.9)
    assert power_w == pytest.approx(20.0)  # the window ends at the device's latest increment, 2.5
    energy.add("a", "gpu0", 5.0, now_s=3.0, since_s=3.0)  # a point
    [(_, _, _, power_w)] = energy.snapshot(3.4)
    assert power_w == pytest.approx(10.0 + 5.0)  # (2, 3]: all of the second and the point
    [(_, _, _, power_w)] = energy.snapshot(4.0)
    assert power_w == 0.0


def test_negative_joules_are_refused() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=10, retain_s=60.0, power_window_s=1.0)
    with pytest.raises(ValueError):
        energy.add("a", "gpu0", -0.1, 0.0)
    with pytest.raises(ValueError):
        energy.add("a", "gpu0", math.nan, 0.0)


def test_key_not_seen_for_retain_s_drops_out() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=10, retain_s=10.0, power_window_s=1.0)
    energy.add("a", "gpu0", 5.0, 0.0)
    energy.add("a", "cpu0", 1.0, 0.0)
    energy.add(IDLE, "gpu0", 1.0, 0.0)
    energy.add("b", "gpu0", 1.0, 5.0)
    assert ("a", "gpu0") in rows_by_series(energy.snapshot(10.0))  # exactly retain_s: still there
    series = rows_by_series(energy.snapshot(10.5))
    assert set(series) == {(IDLE, "gpu0"), ("b", "gpu0")}  # IDLE never expires
    assert energy.series_count == 2
    assert energy.last_seen_s("a") is None
    energy.add("a", "gpu0", 2.0, 11.0)  # a new series, from 0
    assert rows_by_series(energy.snapshot(11.0))[("a", "gpu0")] == 2.0


def test_max_series_folds_the_smallest_into_other() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=3, retain_s=100.0, power_window_s=1.0)
    energy.add("big", "gpu0", 100.0, 0.0)
    energy.add("mid", "gpu0", 10.0, 0.0)
    energy.add("small", "gpu0", 1.0, 0.0)
    assert energy.series_count == 3
    energy.add("tiny", "gpu0", 0.5, 1.0)
    # 4 series: "tiny" folds into a new OTHER series (still 4), then "small": 3 series.
    assert rows_by_series(energy.snapshot(1.0)) == {("big", "gpu0"): 100.0, ("mid", "gpu0"): 10.0, (OTHER, "gpu0"): 1.5}
    assert energy.is_folded("tiny")
    assert energy.is_folded("small")
    assert not energy.is_folded("big")
    # A folded key that comes back keeps accumulating into OTHER, which therefore only grows.
    energy.add("small", "gpu0", 2.0, 2.0)
    assert rows_by_series(energy.snapshot(2.0))[(OTHER, "gpu0")] == 3.5
    assert energy.last_seen_s("small") == 2.0
    # A new key beyond the cap folds the smallest again, even when that is an older key.
    energy.add("huge", "gpu0", 1000.0, 3.0)
    series = rows_by_series(energy.snapshot(3.0))
    assert series == {("big", "gpu0"): 100.0, ("huge", "gpu0"): 1000.0, (OTHER, "gpu0"): 13.5}
    assert energy.series_count == 3


def test_folded_key_is_forgotten_after_retain_s() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=3, retain_s=10.0, power_window_s=1.0)
    energy.add("a", "gpu0", 10.0, 0.0)
    energy.add("d", "gpu0", 20.0, 0.0)
    energy.add("b", "gpu0", 1.0, 0.0)
    energy.add("c", "gpu0", 5.0, 0.0)  # 4 series: b folds (OTHER new, still 4), then c
    assert rows_by_series(energy.snapshot(0.0)) == {("a", "gpu0"): 10.0, ("d", "gpu0"): 20.0, (OTHER, "gpu0"): 6.0}
    energy.add("a", "gpu0", 1.0, 15.0)
    energy.snapshot(15.0)  # b, c and d not seen for 15 s: forgotten; OTHER keeps b's and c's joules
    assert not energy.is_folded("b")
    assert energy.last_seen_s("b") is None
    energy.add("b", "gpu0", 2.0, 16.0)  # room again: b comes back as its own series, from 0
    assert rows_by_series(energy.snapshot(16.0)) == {("a", "gpu0"): 11.0, ("b", "gpu0"): 2.0, (OTHER, "gpu0"): 6.0}
    assert not energy.is_folded("b")


def test_folded_power_carries_over_into_other() -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=2, retain_s=100.0, power_window_s=1.0)
    energy.add("a", "gpu0", 100.0, 0.1)
    energy.add("b", "gpu0", 2.0, 0.5)
    energy.add(OTHER, "gpu0", 1.0, 0.6)  # 3 series: b folds into the existing OTHER
    assert energy.is_folded("b")
    power = {(key, device): watts for key, device, _, watts in energy.snapshot(1.0)}
    assert power[(OTHER, "gpu0")] == pytest.approx(3.0)
    assert power[("a", "gpu0")] == pytest.approx(100.0)


def test_bad_construction_is_refused() -> None:
    with pytest.raises(ValueError):
        WorkloadEnergy(max_series=0, retain_s=1.0, power_window_s=1.0)
    with pytest.raises(ValueError):
        WorkloadEnergy(max_series=1, retain_s=-1.0, power_window_s=1.0)
    with pytest.raises(ValueError):
        WorkloadEnergy(max_series=1, retain_s=1.0, power_window_s=0.0)


# --- properties ----------------------------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
ENERGY = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
PROCESS = st.builds(
    ProcessShare,
    KEYS,
    st.none() | st.floats(min_value=0.0, max_value=1.0),
    st.none() | st.integers(min_value=0, max_value=80 * GIB),
)
PROCESSES = st.lists(PROCESS, max_size=10)
TICKS = st.dictionaries(KEYS, st.floats(min_value=0.0, max_value=1e6))
TOTAL_TICKS = st.floats(min_value=-10.0, max_value=2e6)


@settings(max_examples=300)
@given(energy=ENERGY, processes=PROCESSES)
def test_gpu_split_adds_up_to_the_device_energy(energy: float, processes: list[ProcessShare[str]]) -> None:
    shares, idle = split_gpu_interval(energy, processes)
    assert close(sum(shares.values()) + idle, energy)
    assert set(shares) == {p.key for p in processes}
    assert all(j >= 0 for j in shares.values())
    assert idle == (energy if not processes else 0.0)


@settings(max_examples=300)
@given(energy=ENERGY, ticks=TICKS, total=TOTAL_TICKS)
def test_cpu_split_adds_up_to_the_device_energy(energy: float, ticks: dict[str, float], total: float) -> None:
    shares, system = split_cpu_interval(energy, ticks, total)
    assert close(sum(shares.values()) + system, energy)
    assert set(shares) == set(ticks)
    assert all(j >= 0 for j in shares.values())
    assert system >= 0
    if total > 0 and sum(ticks.values()) > total:
        assert system == 0.0


# One event on one of two devices: a reading after an energy increment, or a process scan with new shares.
EVENT = st.one_of(
    st.tuples(st.just("read"), st.sampled_from(["gpu0", "cpu0"]), ENERGY),
    st.tuples(st.just("gpu"), PROCESSES),
    st.tuples(st.just("cpu"), TICKS, TOTAL_TICKS),
)


@settings(max_examples=200)
@given(start=ENERGY, events=st.lists(EVENT, max_size=40))
def test_splitter_sums_match_each_device_energy(start: float, events: list[tuple[object, ...]]) -> None:
    splitter: DeviceSplitter[str] = DeviceSplitter()
    splitter.add_device("cpu0", DeviceKind.CPU)
    energy = {"gpu0": start, "cpu0": start / 3}
    first = dict(energy)
    by_key: dict[str, dict[Hashable, float]] = {"gpu0": {}, "cpu0": {}}
    for device, value in energy.items():
        assert splitter.on_reading(reading(device, value)) == {}
    for event in events:
        if event[0] == "gpu":
            splitter.set_gpu_shares("gpu0", cast("list[ProcessShare[str]]", event[1]))
            continue
        if event[0] == "cpu":
            splitter.set_cpu_shares("cpu0", cast("dict[str, float]", event[1]), cast(float, event[2]))
            continue
        device, increment = cast(str, event[1]), cast(float, event[2])
        before = energy[device]
        energy[device] += increment
        parts = splitter.on_reading(reading(device, energy[device]))
        assert all(j >= 0 for j in parts.values())
        assert close(sum(parts.values()), energy[device] - before)  # per interval
        for key, joules in parts.items():
            by_key[device][key] = by_key[device].get(key, 0.0) + joules
        assert (IDLE if device == "gpu0" else SYSTEM) in parts
    for device in energy:  # over the whole run
        assert close(sum(by_key[device].values()), energy[device] - first[device])


ADD = st.tuples(
    st.sampled_from(["a", "b", "c", "d", "e", "f", "g", IDLE, SYSTEM, OTHER]),
    st.sampled_from(["gpu0", "gpu1", "cpu0"]),
    st.floats(min_value=0.0, max_value=1e4),
    st.floats(min_value=0.0, max_value=3.0),  # time step, seconds
    st.booleans(),  # snapshot after this add
)


@settings(max_examples=300)
@given(
    max_series=st.integers(min_value=1, max_value=8),
    retain_s=st.sampled_from([0.0, 2.0, 5.0, 1e9]),
    adds=st.lists(ADD, max_size=60),
)
def test_exported_counters_never_go_backwards(
    max_series: int, retain_s: float, adds: list[tuple[Hashable, str, float, float, bool]]
) -> None:
    energy: WorkloadEnergy[Hashable] = WorkloadEnergy(max_series=max_series, retain_s=retain_s, power_window_s=1.0)
    now = 0.0
    added = 0.0
    previous: dict[tuple[Hashable, str], float] = {}
    for key, device, joules, step, take in [*adds, ("a", "gpu0", 0.0, 0.0, True)]:
        now += step
        energy.add(key, device, joules, now)
        added += joules
        if not take:
            continue
        rows = energy.snapshot(now)
        series = rows_by_series(rows)
        assert len(series) == len(rows) == energy.series_count
        for name, joules_now in series.items():
            if name in previous:  # exported at the previous snapshot too: never lower
                assert joules_now >= previous[name]
        for name, joules_before in previous.items():
            if name[0] in (OTHER, IDLE, SYSTEM):  # special series never disappear
                assert series[name] >= joules_before
        assert all(watts >= 0 for _, _, _, watts in rows)
        special = sum(1 for key, _ in series if isinstance(key, SpecialKey))
        assert len(series) <= max(max_series, special)
        if retain_s == 1e9:  # nothing expired: folding moves joules, never loses them
            assert math.isclose(sum(series.values()), added, rel_tol=1e-9, abs_tol=1e-9)
        previous = series


BATCH = st.tuples(
    st.sampled_from(["gpu0", "gpu1", "cpu0"]),
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "d", "e", IDLE, SYSTEM, OTHER]),
        st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e4)),
        max_size=5,
    ),
    st.sampled_from([0.0, 0.05, 0.1, 0.5, 1.0, 3.0]),  # time step, seconds
    st.booleans(),  # snapshot after this batch
)


@settings(max_examples=300)
@given(
    max_series=st.integers(min_value=1, max_value=8),
    retain_s=st.sampled_from([0.0, 2.0, 1e9]),
    batches=st.lists(BATCH, max_size=40),
)
def test_add_many_is_one_add_per_key(
    max_series: int, retain_s: float, batches: list[tuple[str, dict[Hashable, float], float, bool]]
) -> None:
    one: WorkloadEnergy[Hashable] = WorkloadEnergy(max_series=max_series, retain_s=retain_s, power_window_s=1.0)
    many: WorkloadEnergy[Hashable] = WorkloadEnergy(max_series=max_series, retain_s=retain_s, power_window_s=1.0)
    now = 0.0
    for device, joules_by_key, step, take in batches:
        now += step
        for key, joules in joules_by_key.items():
            one.add(key, device, joules, now)
        many.add_many(device, joules_by_key, now)
        assert one.series_count == many.series_count
        for key in ["a", "b", "c", "d", "e", IDLE, SYSTEM, OTHER]:
            assert one.last_seen_s(key) == many.last_seen_s(key)
            assert one.is_folded(key) == many.is_folded(key)
        if take:
            assert sorted(one.snapshot(now), key=repr) == sorted(many.snapshot(now), key=repr)
    assert sorted(one.snapshot(now + 0.5), key=repr) == sorted(many.snapshot(now + 0.5), key=repr)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_add_many_rejects_bad_joules_before_adding_any(bad: float) -> None:
    energy: WorkloadEnergy[str] = WorkloadEnergy(max_series=10, retain_s=60.0, power_window_s=1.0)
    with pytest.raises(ValueError, match="energy must be finite"):
        energy.add_many("gpu0", {"a": 1.0, "b": bad}, 0.0)
    assert energy.series_count == 0
