"""Intensity and price per report bucket (an hour of rollups), so each workload's hourly energy is priced with one
dot product instead of an integration each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from collector.carbon.series import J_PER_KWH, Footprint, IntensitySeries

HOUR_NS = 3600 * 10**9
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class HourlyRates:
    """Per hour: mean gCO2e and price per kWh of measured energy (``pue`` included) over the hour, and the share of
    the hour without intensity (price) data. Energy inside an hour is taken as spread evenly over it."""

    grams_per_kwh: FloatArray
    price_per_kwh: FloatArray | None
    uncovered: FloatArray
    unpriced: FloatArray

    @property
    def known(self) -> npt.NDArray[np.bool_]:
        known: npt.NDArray[np.bool_] = np.logical_and(self.uncovered == 0, self.unpriced == 0)
        return known

    def footprint(self, energy_j: FloatArray) -> Footprint:
        kwh = energy_j / J_PER_KWH
        cost = None if self.price_per_kwh is None else float(np.dot(kwh, self.price_per_kwh))
        return Footprint(
            float(energy_j.sum()),
            float(np.dot(kwh, self.grams_per_kwh)),
            cost,
            float(np.dot(energy_j, self.uncovered)),
            float(np.dot(energy_j, self.unpriced)) if self.price_per_kwh is not None else 0.0,
        )


def hourly_rates(series: IntensitySeries, hour_starts: npt.NDArray[np.int64]) -> HourlyRates:
    n = len(hour_starts)
    grams = np.zeros(n)
    prices = np.zeros(n) if series.price is not None else None
    uncovered = np.zeros(n)
    unpriced = np.zeros(n)
    for i, start in enumerate(hour_starts.tolist()):
        footprint = series.integrate_intervals([start], [start + HOUR_NS], [J_PER_KWH])
        grams[i] = footprint.grams
        uncovered[i] = footprint.uncovered_j / J_PER_KWH
        if prices is not None and footprint.cost is not None:
            prices[i] = footprint.cost
            unpriced[i] = footprint.unpriced_j / J_PER_KWH
    return HourlyRates(grams, prices, uncovered, unpriced)
