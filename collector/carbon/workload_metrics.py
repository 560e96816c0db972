"""The agent's CO2 and cost per workload: each device reading's split (the joules each workload used since the
device's previous reading, about 0.1 s) is priced at the intensity at that reading's time, so the counters follow
intensity changes to within one read interval. Only devices that add into host totals count (not a package's
core/uncore parts, not psys), as in ``wattmeter_phase_energy_joules_total``.

Families (rendered fresh per scrape from the totals held here):
``wattmeter_workload_co2_grams_total{workload,phase,job}``, ``wattmeter_workload_cost_total{workload,phase,job,
currency}`` (only with a price configured), ``wattmeter_grid_carbon_intensity_grams_per_kwh``,
``wattmeter_grid_price_per_kwh{currency}``, and ``wattmeter_carbon_uncovered_joules_total``: energy used at times
the intensity data does not cover (a CSV series that ended), which has no grams rather than guessed ones. With
``[workloads]`` off (``per_workload=False``) only the two grid gauges.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from collector.attribution import SpecialKey
from collector.carbon.series import J_PER_KWH, CarbonSeriesSource, IntensitySeries, Segment
from collector.exporters.exposition import Family
from collector.readings import DeviceReading
from collector.workloads.tracker import WorkloadKey, label_values

Key = WorkloadKey | SpecialKey
WORKLOAD_LABELS = ("workload", "phase", "job")


class WorkloadCarbon:
    """Running gCO2e and cost per workload; ``on_split`` is a ``WorkloadTracker`` split listener."""

    def __init__(
        self,
        source: CarbonSeriesSource,
        monotonic: Callable[[], float] = time.monotonic,
        clock_ns: Callable[[], int] = time.time_ns,
        *,
        per_workload: bool = True,
    ) -> None:
        self.source = source
        self.per_workload = per_workload  # False: the grid's intensity and price only ([workloads] off)
        self._monotonic = monotonic
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._series: IntensitySeries = source.current(monotonic())
        self._segment: Segment | None = None
        self.grams: dict[Key, float] = {}
        self.cost: dict[Key, float] = {}
        self.uncovered_j = 0.0

    def _segment_at(self, t_ns: int) -> Segment:
        segment = self._segment
        if segment is None or not segment.start_ns <= t_ns < segment.end_ns:
            series = self.source.current(self._monotonic())
            self._series = series
            segment = self._segment = series.at(t_ns)
        return segment

    def on_split(self, reading: DeviceReading, joules_by_key: Mapping[Key, float], in_host_total: bool) -> None:
        if not in_host_total:
            return
        with self._lock:
            segment = self._segment_at(reading.time_ns)
            scale = self._series.pue / J_PER_KWH
            intensity, price = segment.g_per_kwh, segment.price_per_kwh
            for key, joules in joules_by_key.items():
                if intensity is None:
                    self.uncovered_j += joules
                    continue
                self.grams[key] = self.grams.get(key, 0.0) + joules * scale * intensity
                if price is not None:
                    self.cost[key] = self.cost.get(key, 0.0) + joules * scale * price

    def families(self) -> list[Family]:
        with self._lock:
            now = self._segment_at(self._clock_ns())
            currency = self._series.currency
            priced = self._series.price is not None
            grams = sorted((label_values(key), value) for key, value in self.grams.items())
            cost = sorted((label_values(key), value) for key, value in self.cost.items())
            uncovered = self.uncovered_j
        co2 = Family(
            "wattmeter_workload_co2_grams",
            "counter",
            "Emissions of the energy attributed to a workload (gCO2e, facility energy: x [carbon] pue), at the grid "
            "intensity when the energy was used.",
            WORKLOAD_LABELS,
        )
        for labels, value in grams:
            co2.add(labels, value)
        families = [co2] if self.per_workload else []
        if priced and self.per_workload:
            money = Family(
                "wattmeter_workload_cost",
                "counter",
                "Electricity cost of the energy attributed to a workload (facility energy), at the price when it "
                "was used, in the currency label's unit.",
                (*WORKLOAD_LABELS, "currency"),
            )
            for labels, value in cost:
                money.add((*labels, currency), value)
            families.append(money)
        intensity = Family(
            "wattmeter_grid_carbon_intensity_grams_per_kwh", "gauge", "Grid carbon intensity now (gCO2e/kWh).", ()
        )
        if now.g_per_kwh is not None:
            intensity.add((), now.g_per_kwh)
        families.append(intensity)
        if priced:
            price = Family("wattmeter_grid_price_per_kwh", "gauge", "Electricity price now, per kWh.", ("currency",))
            if now.price_per_kwh is not None:
                price.add((currency,), now.price_per_kwh)
            families.append(price)
        gap = Family(
            "wattmeter_carbon_uncovered_joules",
            "counter",
            "Workload energy used at times the [carbon] intensity data does not cover (no grams counted for it).",
            (),
        )
        gap.add((), uncovered)
        if self.per_workload:
            families.append(gap)
        return families
