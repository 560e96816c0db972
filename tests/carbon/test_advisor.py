"""The shift advisor on a constructed week whose optimal shift is known by hand."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from collector.carbon.config import CarbonConfig
from collector.carbon.csvfile import parse_csv
from collector.carbon.series import IntensitySeries, series_from_config
from collector.report.advisor import advise
from collector.report.rates import HOUR_NS

T0 = 1_800_000_000 * 10**9 - (1_800_000_000 * 10**9) % (86400 * 10**9)  # a UTC midnight
WEEK = 7 * 24
# night (0-5) clean at 100 g, day 300 g, evening (18-23) 500 g
PROFILE = [100.0] * 6 + [300.0] * 12 + [500.0] * 6
PRICES = [0.10] * 6 + [0.20] * 12 + [0.30] * 6


def hours(n: int = WEEK) -> np.ndarray:
    return T0 + np.arange(n, dtype=np.int64) * HOUR_NS


def test_evening_training_moves_to_the_night_and_saves_what_hand_arithmetic_says() -> None:
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=PROFILE, hourly_price_per_kwh=PRICES))
    energy = np.zeros(WEEK)
    for day in range(7):
        energy[day * 24 + 18 : day * 24 + 22] = 3.6e6 * 2  # 2 kWh an hour, 18:00-22:00, every day
    advice = advise(series, hours(), {"h/train/training/1": energy}, window_s=86400)
    assert advice.reason == ""
    assert advice.windows == 7
    (shift,) = advice.workloads
    # 8 kWh a day at 500 g -> 4 kWh... all 4 blocks fit into the 6 night hours at 100 g
    assert shift.energy_kwh == pytest.approx(56.0)
    assert shift.actual_kg == pytest.approx(56 * 0.5)
    assert shift.shifted_kg == pytest.approx(56 * 0.1)
    assert shift.saved_kg == pytest.approx(56 * 0.4)
    assert shift.saved_cost == pytest.approx(56 * (0.30 - 0.10))
    assert len(shift.moves) == 28
    assert all((m.to_ns - T0) // HOUR_NS % 24 < 6 for m in shift.moves)  # every move goes to a night hour


def test_work_already_in_the_cleanest_hours_saves_nothing() -> None:
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=PROFILE))
    energy = np.zeros(WEEK)
    energy[0:6] = 3.6e6
    advice = advise(series, hours(), {"w": energy}, window_s=86400)
    assert advice.workloads[0].saved_kg == pytest.approx(0.0)
    assert advice.workloads[0].moves == []
    assert advice.workloads[0].saved_cost is None  # no price configured


def test_work_running_every_hour_at_the_same_power_cannot_move() -> None:
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=PROFILE))
    advice = advise(series, hours(), {"w": np.full(WEEK, 3.6e6)}, window_s=86400)
    assert advice.workloads[0].saved_kg == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("config", "n_hours", "flexible", "reason"),
    [
        (CarbonConfig(), WEEK, True, "no saving possible: intensity is constant"),
        (CarbonConfig(hourly_g_per_kwh=PROFILE), 20, True, "too little data: the period holds 20 h"),
        (CarbonConfig(hourly_g_per_kwh=PROFILE), WEEK, False, "no flexible workload"),
    ],
)
def test_says_why_when_nothing_can_be_claimed(config: CarbonConfig, n_hours: int, flexible: bool, reason: str) -> None:
    energy = {"w": np.full(n_hours, 3.6e6)} if flexible else {}
    advice = advise(series_from_config(config), hours(n_hours), energy, window_s=86400)
    assert advice.workloads == []
    assert reason in advice.reason


def test_hours_without_intensity_data_leave_their_window_out() -> None:
    stamps = [datetime.fromtimestamp(T0 // 10**9 + h * 3600, tz=timezone.utc).isoformat() for h in range(30)]
    table = parse_csv("\n".join(f"{stamp},{100 if h % 24 < 6 else 500}" for h, stamp in enumerate(stamps)))
    series = IntensitySeries(table.intensity, None)  # 30 h of data: the second day is mostly not covered
    energy = np.zeros(48)
    energy[20] = energy[44] = 3.6e6
    advice = advise(series, hours(48), {"w": energy}, window_s=86400)
    assert advice.notes == ["1 of 2 windows left out: hours without intensity or price data"]
    assert advice.workloads[0].energy_kwh == pytest.approx(1.0)  # only the first day's
    assert advice.workloads[0].saved_kg == pytest.approx(0.4)
