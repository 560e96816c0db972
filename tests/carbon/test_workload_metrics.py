"""The agent's CO2 and cost counters: each reading's split priced at the intensity of its time, and the agent's
/metrics carrying them when [carbon] is set."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from collector.agent import Agent
from collector.attribution import IDLE
from collector.carbon.config import CarbonConfig
from collector.carbon.series import CarbonSeriesSource
from collector.carbon.workload_metrics import WorkloadCarbon
from collector.config import AgentConfig
from collector.readings import DeviceReading
from tests.fakes.waiting import wait_for

HOUR_NS = 3600 * 10**9
T0 = 1_800_000_000 * 10**9 - (1_800_000_000 * 10**9) % (86400 * 10**9)  # a UTC midnight
TRAIN = ("train", "training", "1")


def reading(t_ns: int) -> DeviceReading:
    return DeviceReading("gpu0", 0.0, None, 0, t_ns)


def test_each_split_is_priced_at_its_own_time() -> None:
    config = CarbonConfig(hourly_g_per_kwh=[100.0, 500.0] + [0.0] * 22, price_per_kwh=0.2, pue=1.5)
    carbon = WorkloadCarbon(CarbonSeriesSource(config), clock_ns=lambda: T0 + HOUR_NS + 1)
    carbon.on_split(reading(T0 + HOUR_NS - 1), {TRAIN: 3.6e6}, True)  # 00:59:59.999: 100 g
    carbon.on_split(reading(T0 + HOUR_NS), {TRAIN: 3.6e6, IDLE: 7.2e6}, True)  # 01:00: 500 g
    carbon.on_split(reading(T0 + HOUR_NS), {TRAIN: 1e9}, False)  # a package part: not in host totals
    assert carbon.grams[TRAIN] == pytest.approx((100 + 500) * 1.5)
    assert carbon.grams[IDLE] == pytest.approx(2 * 500 * 1.5)
    assert carbon.cost[TRAIN] == pytest.approx(2 * 0.2 * 1.5)
    by_name = {family.name: family for family in carbon.families()}
    assert by_name["wattmeter_workload_co2_grams"].samples == [
        ("wattmeter_workload_co2_grams_total", ("workload", "phase", "job"), ("idle", "", ""), pytest.approx(1500.0)),
        ("wattmeter_workload_co2_grams_total", ("workload", "phase", "job"), TRAIN, pytest.approx(900.0)),
    ]
    cost_labels = [s[2] for s in by_name["wattmeter_workload_cost"].samples]
    assert ("train", "training", "1", "EUR") in cost_labels
    assert by_name["wattmeter_grid_carbon_intensity_grams_per_kwh"].samples[0][3] == 500.0
    assert by_name["wattmeter_grid_price_per_kwh"].samples[0][2:] == (("EUR",), 0.2)


def test_energy_past_the_csv_series_is_counted_uncovered(tmp_path: Path) -> None:
    path = tmp_path / "grid.csv"
    path.write_text("2027-01-15T00:00Z,300\n2027-01-15T01:00Z,300\n")
    carbon = WorkloadCarbon(CarbonSeriesSource(CarbonConfig(csv=path)), clock_ns=lambda: T0 + 5 * HOUR_NS)
    carbon.on_split(reading(T0 + 30 * 60 * 10**9), {TRAIN: 3.6e6}, True)
    carbon.on_split(reading(T0 + 3 * HOUR_NS), {TRAIN: 3.6e6}, True)
    assert carbon.grams[TRAIN] == pytest.approx(300.0)
    assert carbon.uncovered_j == 3.6e6
    names = {family.name: family for family in carbon.families()}
    assert names["wattmeter_grid_carbon_intensity_grams_per_kwh"].samples == []  # unknown now: no value
    assert "wattmeter_workload_cost" not in names  # no price: no cost series at all


def _priced_agent(tmp_path: Path, **more: object) -> Agent:
    """An agent with one simulated GPU, a grid at 250 g/kWh and 0.3 USD/kWh, and ``more`` config."""
    return Agent(
        AgentConfig.model_validate(
            {
                "prometheus": {"listen": "127.0.0.1:0"},
                "sources": {
                    "nvml": {"enabled": False},
                    "rapl": {"enabled": False},
                    "cpu_model": {"enabled": False},
                    "simulated": {"gpus": 1, "interval_s": 0.05},
                },
                "api": {"socket": str(tmp_path / "agent.sock")},
                "carbon": {"intensity_g_per_kwh": 250, "price_per_kwh": 0.3, "currency": "USD"},
                **more,
            }
        )
    )


def _grid_gauges(text: str) -> dict[str, str]:
    """The exposition's samples by name and labels; the grid's gauges checked at 250 g/kWh and 0.3 USD/kWh."""
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines["wattmeter_grid_carbon_intensity_grams_per_kwh"]) == 250.0
    assert float(lines['wattmeter_grid_price_per_kwh{currency="USD"}']) == 0.3
    return lines


def test_agent_exports_co2_of_a_simulated_gpu(tmp_path: Path) -> None:
    agent = _priced_agent(tmp_path)
    assert agent.workloads is not None
    agent.workloads.start()
    agent.sampler.start()
    try:
        wait_for(lambda: b"wattmeter_workload_co2_grams_total" in agent.exporter.cache.body(), timeout_s=10)
        time.sleep(0.3)
        text = agent.exporter.cache.body().decode()
    finally:
        agent.shutdown()
    lines = _grid_gauges(text)
    co2 = {k: float(v) for k, v in lines.items() if k.startswith("wattmeter_workload_co2_grams_total")}
    assert co2 and all(v > 0 for v in co2.values())


def test_agent_exports_the_grid_gauges_with_workloads_off(tmp_path: Path) -> None:
    agent = _priced_agent(tmp_path, workloads={"enabled": False})
    assert agent.workloads is None
    agent.sampler.start()
    try:
        wait_for(lambda: b"wattmeter_grid_carbon_intensity_grams_per_kwh" in agent.exporter.cache.body(), timeout_s=10)
        text = agent.exporter.cache.body().decode()
    finally:
        agent.shutdown()
    _grid_gauges(text)
    assert "wattmeter_workload_co2_grams" not in text  # per workload: needs [workloads]
    assert "wattmeter_carbon_uncovered_joules" not in text
