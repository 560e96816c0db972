"""Intensity profiles (DST included), CSV series, and energy integrated against them, against hand-computed values."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from collector.carbon.config import CarbonConfig
from collector.carbon.csvfile import CsvWatcher, parse_csv
from collector.carbon.series import CarbonSeriesSource, series_from_config
from collector.errors import ConfigError

HOUR_NS = 3600 * 10**9
MINUTE_NS = 60 * 10**9


def utc_ns(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()) * 10**9


def test_constant_intensity_one_kwh_is_its_grams() -> None:
    series = series_from_config(CarbonConfig())
    footprint = series.integrate([0, HOUR_NS], [0.0, 3.6e6])
    assert footprint.grams == pytest.approx(400.0)
    assert footprint.cost is None  # no price configured: no cost, not 0
    assert series.constant


def test_known_energy_series_against_hand_computed_grams_and_cost() -> None:
    hourly = [100.0, 300.0] + [50.0] * 22
    prices = [0.10, 0.40] + [0.2] * 22
    config = CarbonConfig(hourly_g_per_kwh=hourly, hourly_price_per_kwh=prices, pue=1.2, timezone="UTC")
    series = series_from_config(config)
    t0 = utc_ns("2027-01-15T00:30:00")
    # samples at 00:30, 00:50, 01:10, 01:30: 1 MJ, 2 MJ (across the 01:00 boundary), 0.5 MJ
    times = [t0, t0 + 20 * MINUTE_NS, t0 + 40 * MINUTE_NS, t0 + 60 * MINUTE_NS]
    cumulative = [0.0, 1e6, 3e6, 3.5e6]
    footprint = series.integrate(times, cumulative)
    # by hand: 1 MJ at 100, 1 MJ at 100 + 1 MJ at 300 (the middle interval split in half at 01:00), 0.5 MJ at 300
    grams = (1e6 * 100 + 1e6 * 100 + 1e6 * 300 + 0.5e6 * 300) / 3.6e6 * 1.2
    cost = (1e6 * 0.10 + 1e6 * 0.10 + 1e6 * 0.40 + 0.5e6 * 0.40) / 3.6e6 * 1.2
    assert footprint.grams == pytest.approx(grams, rel=1e-12)
    assert footprint.cost == pytest.approx(cost, rel=1e-12)
    assert footprint.joules == 3.5e6
    assert footprint.complete


def test_grams_for_interval_averages_the_intensity_over_the_request() -> None:
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=[100.0, 300.0] + [0.0] * 22))
    start = utc_ns("2027-01-15T00:45:00")
    # 3/4 of the request in the 300 g hour: mean 250 g/kWh
    footprint = series.grams_for_interval(start, start + 60 * MINUTE_NS, 3.6e6)
    assert footprint.grams == pytest.approx(0.25 * 100 + 0.75 * 300)


def test_profile_across_spring_dst_change_has_23_local_hours() -> None:
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=[float(h) for h in range(24)], timezone="Europe/Berlin"))
    start = utc_ns("2027-03-27T23:00:00")  # local midnight, CET
    end = utc_ns("2027-03-28T22:00:00")  # next local midnight, CEST: 23 hours later
    segments = series.segments(start, end)
    assert [s.g_per_kwh for s in segments] == [float(h) for h in range(24) if h != 2]
    assert all(s.end_ns - s.start_ns == HOUR_NS for s in segments)
    assert segments[2].start_ns == utc_ns("2027-03-28T01:00:00")  # 03:00 CEST straight after 01:00-02:00 CET


def test_profile_across_autumn_dst_change_repeats_local_hour_two() -> None:
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=[float(h) for h in range(24)], timezone="Europe/Berlin"))
    start = utc_ns("2027-10-30T22:00:00")  # local midnight, CEST
    end = utc_ns("2027-10-31T23:00:00")  # next local midnight, CET: 25 hours later
    segments = series.segments(start, end)
    assert [s.g_per_kwh for s in segments] == [float(h) for h in range(24)]
    durations = [(s.end_ns - s.start_ns) // HOUR_NS for s in segments]
    assert durations[2] == 2 and sum(durations) == 25  # 02:00-03:00 twice, one after the other
    # a kWh spread evenly over the 25-hour day weighs local hour 2 twice
    footprint = series.integrate([start, end], [0.0, 3.6e6])
    assert footprint.grams == pytest.approx((sum(range(24)) + 2) / 25)


def test_monthly_profile_overrides_hourly_for_its_months() -> None:
    config = CarbonConfig(hourly_g_per_kwh=[100.0] * 24, monthly_g_per_kwh={"jul": [20.0] * 24}, timezone="UTC")
    series = series_from_config(config)
    assert series.at(utc_ns("2027-07-01T12:00:00")).g_per_kwh == 20.0
    assert series.at(utc_ns("2027-06-30T23:59:00")).g_per_kwh == 100.0
    assert not series.constant


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hourly_g_per_kwh": [1.0] * 23}, "needs 24"),
        ({"hourly_g_per_kwh": [1.0] * 23 + [-5.0]}, "hour 23 is -5.0"),
        ({"hourly_g_per_kwh": [1.0] * 23 + [float("nan")]}, "finite"),
        ({"monthly_g_per_kwh": {"jul": [1.0] * 24}}, "lacks jan"),
        ({"monthly_g_per_kwh": {"julember": [1.0] * 24}, "hourly_g_per_kwh": [1.0] * 24}, "not a month"),
        ({"timezone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"intensity_g_per_kwh": -1}, "greater than or equal to 0"),
        ({"pue": 0.9}, "greater than or equal to 1"),
        ({"csv": "/x.csv", "hourly_g_per_kwh": [1.0] * 24}, "either csv or hourly"),
        ({"currency": "euro"}, "three-letter"),
    ],
)
def test_config_errors_say_what_is_wrong(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CarbonConfig.model_validate(settings)


CSV_ACROSS_DST = """timestamp,g_per_kwh,price_per_kwh
2027-03-28T00:00:00+01:00,300,0.20
2027-03-28T01:00:00+01:00,200,0.10
2027-03-28T03:00:00+02:00,100,0.05
2027-03-28T04:00:00+02:00,400,0.30
"""


def test_csv_with_offsets_across_dst_is_one_hour_per_row() -> None:
    series = parse_csv(CSV_ACROSS_DST)
    assert series.intensity.step_ns == HOUR_NS
    assert series.price is not None
    start = utc_ns("2027-03-27T23:00:00")
    segments = series.intensity.steps(start, start + 5 * HOUR_NS)
    assert segments[1] == [300.0, 200.0, 100.0, 400.0, None]  # past the last row's hour: unknown
    assert segments[0][-2] == start + 4 * HOUR_NS


def test_csv_energy_outside_the_series_is_uncovered_not_guessed(tmp_path: Path) -> None:
    path = tmp_path / "grid.csv"
    path.write_text(CSV_ACROSS_DST)
    series = series_from_config(CarbonConfig(csv=path))
    start = utc_ns("2027-03-28T02:00:00")  # the last row's hour (04:00 CEST), then an hour past the series
    footprint = series.integrate([start, start + 2 * HOUR_NS], [0.0, 7.2e6])
    assert footprint.grams == pytest.approx(400.0)  # the covered kWh only
    assert footprint.uncovered_j == pytest.approx(3.6e6)
    assert not footprint.complete


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "2027-03-28T00:00:00,300\n2027-03-28T01:00:00,300\n",
            "line 1: timestamp '2027-03-28T00:00:00' has no UTC offset",
        ),
        (
            "2027-01-01T00:00Z,1\n2027-01-01T01:00Z,1\n2027-01-01T03:00Z,1\n",
            "rows are not evenly spaced: line 2 is 1 h after line 1, but line 3 is 2 h after line 2",
        ),
        (  # the gap is between the first two rows: both distances are named, neither blamed
            "2027-01-01T00:00Z,1\n2027-01-01T02:00Z,1\n2027-01-01T03:00Z,1\n",
            "rows are not evenly spaced: line 2 is 2 h after line 1, but line 3 is 1 h after line 2",
        ),
        (
            "time,g_per_kwh\n2027-01-01T00:00Z,1\n2027-01-01T01:00Z,1\n",
            r"line 1: header 'time,g_per_kwh': the header, if any, must be timestamp,g_per_kwh\[,price_per_kwh\]",
        ),
        (
            "2027-01-01T00:00Z,1\n2027-01-01T01:00Z,1\n2027-01-01T01:00Z,1\n",
            "line 3: timestamp 2027-01-01T01:00Z repeats line 2",
        ),
        ("2027-01-01T01:00Z,1\n2027-01-01T00:00Z,1\n", "line 2: timestamp 2027-01-01T00:00Z is before line 1's; sort"),
        ("2027-01-01T00:00Z,1\n2027-01-01T01:00Z,-3\n", "line 2: g_per_kwh is -3"),
        ("2027-01-01T00:00Z,1\n2027-01-01T01:00Z,nan\n", "line 2: g_per_kwh is nan"),
        ("2027-01-01T00:00Z,abc\n", "line 1: g_per_kwh 'abc' is not a number"),
        ("yesterday,1\n", "line 1: 'yesterday' is not an ISO 8601 timestamp"),
        ("2027-01-01T00:00Z,1,0.1\n2027-01-01T01:00Z,1\n", "line 2: 2 fields where earlier rows have 3"),
        ("2027-01-01T00:00Z,1\n", "1 data rows; at least 2"),
    ],
)
def test_csv_errors_name_the_line_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_csv(text)


def test_csv_is_re_read_when_it_changes_and_a_bad_change_keeps_the_old_series(tmp_path: Path) -> None:
    path = tmp_path / "grid.csv"
    path.write_text("2027-01-01T00:00Z,100\n2027-01-01T01:00Z,100\n")
    source = CarbonSeriesSource(CarbonConfig(csv=path, csv_check_interval_s=10))
    t = utc_ns("2027-01-01T00:30:00")
    assert source.current(0.0).at(t).g_per_kwh == 100.0
    path.write_text("2027-01-01T00:00Z,250\n2027-01-01T01:00Z,250\n")
    os.utime(path, ns=(1, 1))  # a different mtime whatever the file system's resolution
    assert source.current(5.0).at(t).g_per_kwh == 100.0  # not checked again before the interval
    assert source.current(10.0).at(t).g_per_kwh == 250.0
    path.write_text("2027-01-01T00:00Z,250\n2027-01-01T05:00Z,1\n2027-01-01T06:00Z,1\n")
    os.utime(path, ns=(2, 2))
    assert source.current(20.0).at(t).g_per_kwh == 250.0  # the invalid file is not taken
    assert source.error is not None and "no gaps" in source.error


def test_csv_price_column_beside_a_configured_price_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "grid.csv"
    path.write_text("timestamp,g_per_kwh,price_per_kwh\n2027-01-01T00:00Z,100,0.2\n2027-01-01T01:00Z,100,0.3\n")
    with pytest.raises(ConfigError, match="price_per_kwh column and \\[carbon\\] sets price_per_kwh too"):
        CarbonSeriesSource(CarbonConfig(csv=path, price_per_kwh=0.1))
    assert CarbonSeriesSource(CarbonConfig(csv=path)).current(0.0).price is not None


@pytest.mark.parametrize(
    ("carbon", "message"),
    [
        ({"csv": "grid.csv", "intensity_g_per_kwh": 300}, "intensity_g_per_kwh and csv are both set"),
        ({"hourly_g_per_kwh": [1.0] * 24, "intensity_g_per_kwh": 400}, "intensity_g_per_kwh and hourly_g_per_kwh"),
        ({"monthly_g_per_kwh": {"jan": [1.0] * 24}, "hourly_g_per_kwh": [1.0] * 24, "intensity_g_per_kwh": 1}, "keep"),
        ({"price_per_kwh": 0.2, "hourly_price_per_kwh": [0.1] * 24}, "price_per_kwh and hourly_price_per_kwh"),
    ],
)
def test_a_value_another_key_would_override_is_refused(carbon: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CarbonConfig.model_validate(carbon)


def test_the_default_intensity_beside_a_profile_and_a_price_fallback_are_fine() -> None:
    CarbonConfig(hourly_g_per_kwh=[1.0] * 24)
    CarbonConfig(monthly_price_per_kwh={"jan": [0.1] * 24}, price_per_kwh=0.2)  # price_per_kwh: the other months


def test_csv_watcher_refuses_a_missing_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        CsvWatcher(tmp_path / "missing.csv")
