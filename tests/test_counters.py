from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.counters import EnergyCounter, PowerIntegrator


def test_first_reading_sets_baseline_and_total() -> None:
    counter = EnergyCounter(scale_j=1e-6, max_range=1000)
    assert counter.update(400) == 0
    assert counter.total_j == pytest.approx(400e-6)


def test_wrap_is_folded_in() -> None:
    counter = EnergyCounter(scale_j=1.0, max_range=1000)
    counter.update(900)
    assert counter.update(50) == 150  # 900 -> 1000 (wrap) -> 50
    assert counter.wraps == 1
    assert counter.total_raw == 1050


def test_reset_without_range_counts_energy_since_reset() -> None:
    counter = EnergyCounter(scale_j=1e-3)
    counter.update(5_000)
    counter.update(7_000)
    assert counter.update(300) == 300  # driver reload: counter restarted from 0
    assert counter.resets == 1
    assert counter.total_raw == 7_300


def test_negative_raw_is_refused() -> None:
    with pytest.raises(ValueError):
        EnergyCounter(scale_j=1.0).update(-1)


@st.composite
def counter_histories(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int]]]:
    """A max range, a start value and a list of events: ('add', joules below the range) or ('reset', 0)."""
    max_range = draw(st.integers(min_value=10, max_value=2**40))
    start = draw(st.integers(min_value=0, max_value=max_range - 1))
    events = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("add"), st.integers(min_value=0, max_value=max_range - 1)),
                st.tuples(st.just("reset"), st.integers(min_value=0, max_value=max_range - 1)),
            ),
            max_size=60,
        )
    )
    return max_range, start, events


@settings(max_examples=300)
@given(counter_histories())
def test_wrapping_counter_total_is_monotonic_and_exact(
    history: tuple[int, int, list[tuple[str, int]]],
) -> None:
    max_range, start, events = history
    counter = EnergyCounter(scale_j=1e-6, max_range=max_range)
    raw = start
    counter.update(raw)
    true_total = start
    previous = counter.total_j
    for kind, amount in events:
        if kind == "reset":
            continue  # a wrapping counter (RAPL) has no resets; exercised in the next test
        raw = (raw + amount) % max_range
        true_total += amount
        counter.update(raw)
        assert counter.total_j >= previous
        previous = counter.total_j
    assert counter.total_raw == true_total  # exact in counter units: the resolution of the hardware


@settings(max_examples=300)
@given(counter_histories())
def test_resetting_counter_total_is_monotonic_and_exact(
    history: tuple[int, int, list[tuple[str, int]]],
) -> None:
    _, start, events = history
    counter = EnergyCounter(scale_j=1e-3)
    raw = start
    counter.update(raw)
    true_total = start
    previous = counter.total_j
    for kind, amount in events:
        if kind == "reset":
            # the driver reloads, then the GPU uses `amount` mJ before the next read;
            # a reset to a value above the last one is indistinguishable from growth, so keep it below
            amount = min(amount, max(raw - 1, 0))
            raw = amount
        else:
            raw += amount
        true_total += amount
        counter.update(raw)
        assert counter.total_j >= previous
        previous = counter.total_j
    assert counter.total_raw == true_total


def test_trapezoid_integration() -> None:
    integrator = PowerIntegrator()
    integrator.update(100.0, 0)
    integrator.update(200.0, 1_000_000_000)  # 1 s at a mean of 150 W
    integrator.update(200.0, 3_000_000_000)  # 2 s at 200 W
    assert integrator.total_j == pytest.approx(550.0)


def test_integration_ignores_samples_out_of_order() -> None:
    integrator = PowerIntegrator()
    integrator.update(100.0, 2_000_000_000)
    integrator.update(500.0, 1_000_000_000)
    assert integrator.total_j == 0.0
    integrator.update(100.0, 3_000_000_000)
    assert integrator.total_j == pytest.approx(100.0)


def test_rebase_keeps_the_total_and_takes_the_next_reading_as_baseline() -> None:
    counter = EnergyCounter(scale_j=1.0, max_range=1000)
    counter.update(100)
    counter.update(400)
    counter.rebase()  # the zone vanished; it comes back reading 50, lower than before, which is no wrap
    assert counter.update(50) == 0
    assert counter.total_raw == 400
    assert counter.update(80) == 30
    assert counter.total_raw == 430
    assert counter.wraps == 0


def test_integrator_restart_integrates_nothing_across_the_gap() -> None:
    integrator = PowerIntegrator()
    integrator.update(100.0, 0)
    integrator.update(100.0, 1_000_000_000)
    integrator.restart()
    integrator.update(300.0, 61_000_000_000)  # a minute later: no energy invented for the gap
    integrator.update(300.0, 62_000_000_000)
    assert integrator.total_j == pytest.approx(400.0)
