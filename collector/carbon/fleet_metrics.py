"""The aggregator's fleet CO2 and cost: ``wattmeter_fleet_co2_grams_total{host,phase}`` and
``wattmeter_fleet_cost_total{host,phase,currency}``, beside ``wattmeter_fleet_energy_joules_total``.

Driven by scrapes: at each, the fleet energy counters' growth since the previous scrape is taken as used evenly
between the two scrapes and integrated against the intensity over that time (exact piecewise; see
``IntensitySeries``). So the counters follow intensity to within a scrape interval; energy that arrives late (an
agent replaying its spool after an outage) is counted at the time it arrives. They start at 0 when the aggregator
starts (a counter reset: use rate()/increase()); history is in ``wattmeter report``, which prices each hour of
the stored rollups at that hour's intensity.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from collector.carbon.series import CarbonSeriesSource
from collector.exporters.exposition import Family

FleetKey = tuple[str, str]  # host, phase label


class FleetCarbon:
    def __init__(
        self,
        source: CarbonSeriesSource,
        energy: Callable[[], Mapping[FleetKey, float]],
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._energy = energy
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._seen = dict(energy())  # what was there before (seeded history) gets no grams here
        self._seen_ns = clock_ns()
        self.grams: dict[FleetKey, float] = {}
        self.cost: dict[FleetKey, float] = {}

    def update(self) -> None:
        with self._lock:
            now_ns = self._clock_ns()
            totals = dict(self._energy())
            series = self.source.current(self._monotonic())
            for key, joules in totals.items():
                delta = joules - self._seen.get(key, 0.0)
                if delta <= 0:
                    continue
                footprint = series.integrate_intervals([self._seen_ns], [max(now_ns, self._seen_ns)], [delta])
                self.grams[key] = self.grams.get(key, 0.0) + footprint.grams
                if footprint.cost is not None:
                    self.cost[key] = self.cost.get(key, 0.0) + footprint.cost
            self._seen = totals
            self._seen_ns = max(now_ns, self._seen_ns)

    def families(self) -> list[Family]:
        self.update()
        series = self.source.current(self._monotonic())
        co2 = Family(
            "wattmeter_fleet_co2_grams",
            "counter",
            "Emissions of the fleet energy (gCO2e, facility energy: x [carbon] pue) by host and phase, at the grid "
            "intensity between the scrapes that saw it arrive; from 0 at the aggregator's start.",
            ("host", "phase"),
        )
        with self._lock:
            grams = sorted(self.grams.items())
            cost = sorted(self.cost.items())
        for key, value in grams:
            co2.add(key, value)
        families = [co2]
        if series.price is not None:
            money = Family(
                "wattmeter_fleet_cost",
                "counter",
                "Electricity cost of the fleet energy by host and phase (facility energy), in the currency label's "
                "unit; from 0 at the aggregator's start.",
                ("host", "phase", "currency"),
            )
            for key, value in cost:
                money.add((*key, series.currency), value)
            families.append(money)
        return families
