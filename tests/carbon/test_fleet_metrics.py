"""The aggregator's fleet CO2 and cost: energy growth between scrapes priced over the time between them."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.aggregator.config import AggregatorConfig
from collector.aggregator.service import Aggregator
from collector.carbon.config import CarbonConfig
from collector.carbon.fleet_metrics import FleetCarbon
from collector.carbon.series import CarbonSeriesSource

HOUR_NS = 3600 * 10**9
T0 = 1_800_000_000 * 10**9 - (1_800_000_000 * 10**9) % (86400 * 10**9)


def test_growth_between_scrapes_is_priced_over_the_time_between_them() -> None:
    energy = {("host-1", "training"): 5e9}  # seeded history: no grams for it
    clock = [T0 + HOUR_NS // 2]
    config = CarbonConfig(hourly_g_per_kwh=[100.0, 300.0] + [0.0] * 22, price_per_kwh=0.5)
    fleet = FleetCarbon(CarbonSeriesSource(config), lambda: energy, clock_ns=lambda: clock[0])
    energy[("host-1", "training")] += 7.2e6  # 2 kWh from 00:30 to 01:30: half at 100 g, half at 300 g
    energy[("host-1", "idle")] = 3.6e6
    clock[0] = T0 + 3 * HOUR_NS // 2
    by_name = {family.name: family for family in fleet.families()}
    samples = {s[2]: s[3] for s in by_name["wattmeter_fleet_co2_grams"].samples}
    assert samples[("host-1", "training")] == pytest.approx(100 + 300)
    assert samples[("host-1", "idle")] == pytest.approx(200)
    cost = {s[2]: s[3] for s in by_name["wattmeter_fleet_cost"].samples}
    assert cost[("host-1", "training", "EUR")] == pytest.approx(1.0)
    # nothing new: the counters stay
    clock[0] += HOUR_NS
    again = {s[2]: s[3] for s in fleet.families()[0].samples}
    assert again == samples


def test_aggregator_with_carbon_serves_fleet_co2_beside_fleet_energy(tmp_path: Path) -> None:
    config = AggregatorConfig.model_validate(
        {
            "grpc": {"listen": "127.0.0.1:0"},
            "http": {"listen": "127.0.0.1:0"},
            "storage": {"url": f"sqlite:///{tmp_path / 'a.db'}"},
            "ingest": {"workers": 0},
            "carbon": {"intensity_g_per_kwh": 300},
        }
    )
    aggregator = Aggregator(config)
    try:
        aggregator.metrics.add_stored(10, {("host-1", "training"): 3.6e6}, {})
        names = {family.name: family for family in aggregator.metrics.families()}
        assert "wattmeter_fleet_energy_joules" in names
        # the energy arrived within this instant: priced at the constant 300 g
        assert names["wattmeter_fleet_co2_grams"].samples[0][2:] == (("host-1", "training"), pytest.approx(300.0))
    finally:
        aggregator.close()
