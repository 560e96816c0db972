"""Review of a request's gCO2e (``co2_g``) and cost: hand-computed scenarios through the request engine and a real
store (SQLite and PostgreSQL), the ``[carbon]`` config as the aggregator reads it, the HTTP API's JSON and the
report's per-model sums."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from collector.aggregator.config import RequestsConfig
from collector.aggregator.http_api import request_json
from collector.aggregator.request_engine import RequestEngine
from collector.carbon.config import CarbonConfig
from collector.carbon.series import CarbonSeriesSource, IntensitySeries, series_from_config
from collector.carbon.steps import ConstantSteps, TableSteps
from collector.report.data import build_report
from collector.store.base import RequestResult, SpanRow, Store
from tests.aggregator.test_request_engine import constant_host
from tests.fakes.request_world import IDLE, T0, WORKLOAD, S

KWH = 3.6e6
HOUR = 3600 * S


class Clock:
    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


def steady_host(
    store: Store,
    start_ns: int,
    seconds: int,
    watts: float = 100.0,
    shares: dict[tuple[str, str, str], float] | None = None,
    hostname: str = "host-a",
) -> None:
    """gpu0 of ``hostname`` at ``watts`` from ``start_ns`` for ``seconds`` at 10 Hz, split by ``shares``."""
    constant_host(store, hostname, watts, seconds, shares, start_ns=start_ns)


def result(store: Store, request_id: str) -> RequestResult:
    found = store.request(request_id)
    assert found is not None, request_id
    return found


def engine(store: Store, now_ns: int, series: IntensitySeries | None, **requests: object) -> RequestEngine:
    carbon = None if series is None else (lambda: series)
    return RequestEngine(store, RequestsConfig.model_validate(requests), clock_ns=Clock(now_ns), carbon=carbon)


def test_t0_is_a_utc_hour() -> None:
    assert datetime.fromtimestamp(T0 // S, tz=timezone.utc).minute == 0


# -- time: integrated over the request, across an hour boundary of an hourly profile


def test_a_request_across_an_hour_boundary_pays_each_hour_at_its_own_rate(store: Store) -> None:
    """Hourly profile (UTC): 07:00 at 100 g/kWh and 0.10, 08:00 (T0) at 500 g/kWh and 0.30; PUE 1.2. 100 W from
    T0 - 10 s; a request from T0 - 2 s to T0 + 2 s draws 400 J, half in each hour."""
    hourly_g = [0.0] * 24
    hourly_g[7], hourly_g[8] = 100.0, 500.0
    prices = [0.0] * 24
    prices[7], prices[8] = 0.10, 0.30
    config = CarbonConfig(hourly_g_per_kwh=hourly_g, hourly_price_per_kwh=prices, pue=1.2)
    series = CarbonSeriesSource(config).current(0.0)
    steady_host(store, T0 - 10 * S, 20)
    store.write_spans([SpanRow("a", "s", "host-a", T0 - 2 * S, T0 + 2 * S, workload="vllm", model="m")])
    engine(store, T0 + 60 * S, series).run_pass()
    a = result(store, "a")
    assert (a.status, a.active_j) == ("final", pytest.approx(400.0, rel=1e-9))
    assert a.co2_g == pytest.approx(400.0 / KWH * 1.2 * (100.0 + 500.0) / 2, rel=1e-9)
    assert a.cost == pytest.approx(400.0 / KWH * 1.2 * (0.10 + 0.30) / 2, rel=1e-9)
    # in grams (not kg) and J -> kWh by 3.6e6: 400 J at 300 g/kWh x 1.2 is 0.04 g
    assert a.co2_g == pytest.approx(0.04, rel=1e-9)


def test_a_request_within_one_hour_is_priced_at_that_hour_alone(store: Store) -> None:
    hourly_g = [50.0] * 24
    hourly_g[8] = 200.0
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=hourly_g, price_per_kwh=0.25, pue=1.5))
    steady_host(store, T0, 20)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    engine(store, T0 + 60 * S, series).run_pass()
    a = result(store, "a")
    assert a.co2_g == pytest.approx(400.0 / KWH * 1.5 * 200.0, rel=1e-9)
    assert a.cost == pytest.approx(400.0 / KWH * 1.5 * 0.25, rel=1e-9)


# -- which energy: active (not full), times the [carbon] pue (not [requests] pue)


def test_active_energy_is_priced_with_the_carbon_pue_not_the_full_view(store: Store) -> None:
    """60 W to vllm, 40 W idle: a request of 2 s has 120 J active and (120 + 80) x 2.0 full; priced: 120 J x 1.5."""
    steady_host(store, T0, 20, shares={WORKLOAD: 0.6, IDLE: 0.4})
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    series = IntensitySeries(ConstantSteps(400.0), ConstantSteps(0.2), pue=1.5)
    engine(store, T0 + 60 * S, series, pue=2.0).run_pass()
    a = result(store, "a")
    assert a.active_j == pytest.approx(120.0, rel=1e-9)
    assert a.full_j == pytest.approx(200.0 * 2.0, rel=1e-9)
    assert a.co2_g == pytest.approx(120.0 / KWH * 1.5 * 400.0, rel=1e-9)
    assert a.cost == pytest.approx(120.0 / KWH * 1.5 * 0.2, rel=1e-9)


# -- absent [carbon], no price, no samples, approximate


def test_without_carbon_co2_and_cost_are_null_in_the_api(store: Store) -> None:
    steady_host(store, T0, 20)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    engine(store, T0 + 60 * S, None).run_pass()
    body = request_json(result(store, "a"))
    assert body["energy_j"]["active"] == pytest.approx(200.0, rel=1e-9)
    assert (body["co2_g"], body["cost"]) == (None, None)


def test_without_a_price_cost_is_null_and_co2_is_not(store: Store) -> None:
    steady_host(store, T0, 20)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    engine(store, T0 + 60 * S, series_from_config(CarbonConfig(intensity_g_per_kwh=300.0))).run_pass()
    body = request_json(result(store, "a"))
    assert body["co2_g"] == pytest.approx(200.0 / KWH * 300.0, rel=1e-9)
    assert body["cost"] is None


def test_a_zero_price_is_a_cost_of_zero_not_null(store: Store) -> None:
    steady_host(store, T0, 20)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    engine(store, T0 + 60 * S, series_from_config(CarbonConfig(price_per_kwh=0.0))).run_pass()
    a = result(store, "a")
    assert a.cost == 0.0 and a.co2_g == pytest.approx(200.0 / KWH * 400.0, rel=1e-9)


def test_no_samples_has_null_co2_and_cost_and_approximate_prices_its_lower_bound(store: Store) -> None:
    steady_host(store, T0, 5)  # samples stop at T0 + 5 s
    store.write_spans(
        [
            SpanRow("approx", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm"),
            SpanRow("silent", "s", "host-z", T0 + 2 * S, T0 + 8 * S, workload="vllm"),
        ]
    )
    series = IntensitySeries(ConstantSteps(400.0), ConstantSteps(0.5), pue=1.25)
    engine(store, T0 + 120 * S, series, finalize_grace_s=30).run_pass()
    approx, silent = result(store, "approx"), result(store, "silent")
    assert approx.status == "approximate" and approx.active_j == pytest.approx(300.0, rel=1e-9)
    assert approx.co2_g == pytest.approx(300.0 / KWH * 1.25 * 400.0, rel=1e-9)
    assert approx.cost == pytest.approx(300.0 / KWH * 1.25 * 0.5, rel=1e-9)
    assert (silent.status, silent.co2_g, silent.cost) == ("no_samples", None, None)
    assert (request_json(silent)["co2_g"], request_json(silent)["cost"]) == (None, None)


# -- revisions


def test_a_late_neighbour_recomputes_the_co2_and_cost_of_a_final_request(store: Store) -> None:
    steady_host(store, T0, 20)
    series = IntensitySeries(ConstantSteps(400.0), ConstantSteps(0.2), pue=1.1)
    eng = engine(store, T0 + 60 * S, series)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    eng.run_pass()
    assert result(store, "a").co2_g == pytest.approx(400.0 / KWH * 1.1 * 400.0, rel=1e-9)
    store.write_spans([SpanRow("b", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm")])
    eng.run_pass()
    a, b = result(store, "a"), result(store, "b")
    assert a.active_j == pytest.approx(300.0, rel=1e-9) and b.active_j == pytest.approx(300.0, rel=1e-9)
    assert a.co2_g == pytest.approx(300.0 / KWH * 1.1 * 400.0, rel=1e-9)
    assert a.cost == pytest.approx(300.0 / KWH * 1.1 * 0.2, rel=1e-9)
    assert b.co2_g == pytest.approx(300.0 / KWH * 1.1 * 400.0, rel=1e-9)


def test_a_late_span_of_the_request_itself_recomputes_it_over_its_new_time(store: Store) -> None:
    """Intensity 100 until T0 + 10 s, then 500. Span 1 [2, 4] s: 200 J at 100. A late span 2 [12, 14] s: 400 J over
    [2, 14] s, 8 s at 100 and 4 s at 500: mean 700 / 3."""
    steady_host(store, T0, 20)
    series = IntensitySeries(TableSteps([T0, T0 + 10 * S], [100.0, 500.0], 10 * S), None)
    eng = engine(store, T0 + 60 * S, series)
    store.write_spans([SpanRow("a", "s1", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    eng.run_pass()
    assert result(store, "a").co2_g == pytest.approx(200.0 / KWH * 100.0, rel=1e-9)
    store.write_spans([SpanRow("a", "s2", "host-a", T0 + 12 * S, T0 + 14 * S, workload="vllm")])
    eng.run_pass()
    a = result(store, "a")
    assert a.active_j == pytest.approx(400.0, rel=1e-9)
    assert a.co2_g == pytest.approx(400.0 / KWH * (8 * 100.0 + 4 * 500.0) / 12, rel=1e-9)


# -- gaps and stale intensity data (a CSV series)


def _csv(tmp_path: Path, rows: list[tuple[int, float, float]]) -> Path:
    path = tmp_path / "grid.csv"
    lines = ["timestamp,g_per_kwh,price_per_kwh"]
    for t_ns, grams, price in rows:
        stamp = datetime.fromtimestamp(t_ns // S, tz=timezone.utc).isoformat()
        lines.append(f"{stamp},{grams},{price}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_request_half_past_the_end_of_a_csv_series_gets_grams_for_the_covered_half(
    store: Store, tmp_path: Path
) -> None:
    """Rows every 5 s from T0 - 10 s, the last at T0 (holding to T0 + 5 s). A request from T0 + 3 s to T0 + 7 s: the
    first half covered at 200 g/kWh, the rest uncovered (no grams, never a guessed intensity)."""
    path = _csv(tmp_path, [(T0 - 10 * S, 100.0, 0.1), (T0 - 5 * S, 150.0, 0.1), (T0, 200.0, 0.3)])
    series = series_from_config(CarbonConfig(csv=path))
    steady_host(store, T0, 20)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 3 * S, T0 + 7 * S, workload="vllm")])
    engine(store, T0 + 60 * S, series).run_pass()
    a = result(store, "a")
    assert a.co2_g == pytest.approx(200.0 / KWH * 200.0, rel=1e-9)
    assert a.cost == pytest.approx(200.0 / KWH * 0.3, rel=1e-9)


def test_a_request_wholly_past_the_end_of_a_csv_series_has_unknown_co2_not_zero(store: Store, tmp_path: Path) -> None:
    """A stale series (its last row's step ended before the request began): no intensity at all over the request.
    Its gCO2e and cost are unknown (null), not 0 g: 0 is what a grid at 0 g/kWh would give."""
    path = _csv(tmp_path, [(T0 - 20 * S, 100.0, 0.1), (T0 - 10 * S, 150.0, 0.1)])
    series = series_from_config(CarbonConfig(csv=path))
    steady_host(store, T0, 20)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    engine(store, T0 + 60 * S, series).run_pass()
    a = result(store, "a")
    assert (a.status, a.active_j) == ("final", pytest.approx(400.0, rel=1e-9))
    assert (a.co2_g, a.cost) == (None, None)


# -- the report's per-model sums against the per-request values


def test_the_report_s_model_kg_and_cost_equal_the_sum_of_its_requests(store: Store) -> None:
    """Constant intensity and price: the report's kg and cost per model (the store's sums of active J per model and
    hour, priced at the hour's rate) equal the requests' own co2_g and cost summed."""
    steady_host(store, T0, 20)
    series = IntensitySeries(ConstantSteps(300.0), ConstantSteps(0.4), pue=1.3)
    store.write_spans(
        [
            SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm", model="m"),
            SpanRow("b", "s", "host-a", T0 + 4 * S, T0 + 9 * S, workload="vllm", model="m"),
            SpanRow("c", "s", "host-a", T0 + 10 * S, T0 + 12 * S, workload="vllm", model="n"),
        ]
    )
    engine(store, T0 + 60 * S, series).run_pass()
    requests = [result(store, rid) for rid in ("a", "b", "c")]
    report = build_report(store, series, T0, T0 + HOUR)
    rows = {row.model: row for row in report.models}
    for model in ("m", "n"):
        mine = [r for r in requests if r.model == model]
        assert all(r.co2_g is not None and r.cost is not None for r in mine)
        assert rows[model].kg == pytest.approx(sum(r.co2_g or 0.0 for r in mine) / 1000, rel=1e-9)
        assert rows[model].cost == pytest.approx(sum(r.cost or 0.0 for r in mine), rel=1e-9)


def test_an_hourly_profile_in_a_half_hour_zone_changes_at_its_local_hours(store: Store) -> None:
    """Asia/Kolkata (+05:30): T0 (08:00 UTC) is 13:30 local, not an hour boundary; 08:30 UTC (T0 + 30 min) is 14:00.
    A request from T0 + 1798 s to T0 + 1802 s pays local hours 13 and 14 half each."""
    hourly = [0.0] * 24
    hourly[13], hourly[14] = 120.0, 360.0
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=hourly, timezone="Asia/Kolkata"))
    start = T0 + 1790 * S
    steady_host(store, start, 20)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 1798 * S, T0 + 1802 * S, workload="vllm")])
    engine(store, start + 120 * S, series).run_pass()
    a = result(store, "a")
    assert a.active_j == pytest.approx(400.0, rel=1e-9)
    assert a.co2_g == pytest.approx(400.0 / KWH * (120.0 + 360.0) / 2, rel=1e-9)


def test_a_request_across_a_dst_change_pays_the_local_hours_on_each_side(store: Store) -> None:
    """Europe/Berlin, 2027-03-28 01:00 UTC: local 02:00 CET becomes 03:00 CEST. A request from 00:59:58 to 01:00:02
    UTC runs in local hour 1, then 3 (hour 2 does not exist that day)."""
    change = int(datetime(2027, 3, 28, 1, tzinfo=timezone.utc).timestamp()) * S
    hourly = [0.0] * 24
    hourly[1], hourly[2], hourly[3] = 100.0, 9999.0, 300.0
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=hourly, timezone="Europe/Berlin"))
    steady_host(store, change - 10 * S, 20)
    store.write_spans([SpanRow("a", "s", "host-a", change - 2 * S, change + 2 * S, workload="vllm")])
    engine(store, change + 120 * S, series).run_pass()
    a = result(store, "a")
    assert a.active_j == pytest.approx(400.0, rel=1e-9)
    assert a.co2_g == pytest.approx(400.0 / KWH * (100.0 + 300.0) / 2, rel=1e-9)


def test_requests_hours_apart_in_one_pass_each_get_their_own_rate(store: Store) -> None:
    """One pass, two requests five hours apart (hourly profile): each at its own hour's rate."""
    hourly = [float(10 * h) for h in range(24)]
    series = series_from_config(CarbonConfig(hourly_g_per_kwh=hourly, pue=1.1))
    steady_host(store, T0, 20)
    later = T0 + 5 * HOUR
    steady_host(store, later, 20, hostname="host-b")
    store.write_spans(
        [
            SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm"),
            SpanRow("b", "s", "host-b", later + 2 * S, later + 4 * S, workload="vllm"),
        ]
    )
    engine(store, later + 120 * S, series).run_pass()
    assert result(store, "a").co2_g == pytest.approx(200.0 / KWH * 1.1 * 80.0, rel=1e-9)
    assert result(store, "b").co2_g == pytest.approx(200.0 / KWH * 1.1 * 130.0, rel=1e-9)


def test_per_interval_is_nan_only_with_energy_and_no_data_at_all() -> None:
    series = IntensitySeries(
        TableSteps([T0, T0 + 10 * S], [100.0, 300.0], 10 * S), TableSteps([T0, T0 + 10 * S], [0.1, 0.3], 10 * S)
    )
    starts = [T0 + 30 * S, T0 + 30 * S, T0 + 15 * S, T0 + 2 * S]
    ends = [T0 + 34 * S, T0 + 34 * S, T0 + 25 * S, T0 + 12 * S]
    grams, cost = series.per_interval(starts, ends, [KWH, 0.0, KWH, KWH])
    assert cost is not None
    assert np.isnan(grams[0]) and np.isnan(cost[0])
    assert (grams[1], cost[1]) == (0.0, 0.0)  # no energy: nothing, whatever the intensity
    assert grams[2] == pytest.approx(150.0) and cost[2] == pytest.approx(0.15)  # half covered: that half only
    assert grams[3] == pytest.approx((8 * 100.0 + 2 * 300.0) / 10)
