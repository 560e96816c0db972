"""``IntensitySeries``: grid intensity and price at any time, and energy integrated against them exactly.

Energy between two samples is taken as drawn at a steady rate between them (the samples say nothing finer), so an
interval that crosses an intensity boundary is split there in proportion to time:

    grams = sum over pieces of  J_piece / 3.6e6 * pue * g_per_kwh(piece)

Energy at times the data does not cover (outside a CSV series) gets no grams: it is counted as ``uncovered_j``
instead, never priced at a guessed value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from collector.carbon.config import CarbonConfig
from collector.carbon.csvfile import CsvWatcher
from collector.carbon.steps import ConstantSteps, ProfileSteps, StepList, Steps, Value, merge

J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Segment:
    """``[start_ns, end_ns)`` at one intensity (gCO2e/kWh) and price per kWh; None where unknown."""

    start_ns: int
    end_ns: int
    g_per_kwh: Value
    price_per_kwh: Value


@dataclass(frozen=True)
class Footprint:
    """What some energy amounted to. ``grams``/``cost`` cover only the energy at known intensity/price; the rest is
    in ``uncovered_j``/``unpriced_j``. ``cost`` is None when no price is configured."""

    joules: float
    grams: float
    cost: float | None
    uncovered_j: float = 0.0
    unpriced_j: float = 0.0

    @property
    def complete(self) -> bool:
        return self.uncovered_j == 0.0 and (self.cost is None or self.unpriced_j == 0.0)


class IntensitySeries:
    """Intensity and price as step functions of time, with the facility overhead ``pue``."""

    def __init__(self, intensity: Steps, price: Steps | None, *, pue: float = 1.0, currency: str = "EUR") -> None:
        self.intensity = intensity
        self.price = price
        self.pue = pue
        self.currency = currency

    @property
    def constant(self) -> bool:
        """Intensity the same at every time: moving work in time cannot lower its emissions."""
        return self.intensity.constant

    @property
    def price_constant(self) -> bool:
        return self.price is None or self.price.constant

    def segments(self, start_ns: int, end_ns: int) -> list[Segment]:
        """The pieces of ``[start_ns, end_ns)`` on which intensity and price are both constant."""
        if end_ns <= start_ns:
            return []
        no_price: StepList = ([start_ns, end_ns], [None])
        price_steps = self.price.steps(start_ns, end_ns) if self.price is not None else no_price
        boundaries, intensities, prices = merge(self.intensity.steps(start_ns, end_ns), price_steps)
        return [Segment(boundaries[i], boundaries[i + 1], intensities[i], prices[i]) for i in range(len(intensities))]

    def at(self, t_ns: int) -> Segment:
        """The segment holding ``t_ns``, as far as the next change within an hour."""
        return self.segments(t_ns, t_ns + 3600 * 10**9)[0]

    def integrate_intervals(
        self,
        start_ns: npt.ArrayLike,
        end_ns: npt.ArrayLike,
        joules: npt.ArrayLike,
    ) -> Footprint:
        """Energy ``joules[i]`` drawn at a steady rate over ``[start_ns[i], end_ns[i])`` (a zero-length interval:
        at that instant), summed. Exact for step-function intensity."""
        starts = np.asarray(start_ns, dtype=np.int64)
        ends = np.asarray(end_ns, dtype=np.int64)
        energy = np.asarray(joules, dtype=np.float64)
        if starts.size == 0:
            return Footprint(0.0, 0.0, None if self.price is None else 0.0)
        grams, uncovered, money, unpriced = self._means(starts, ends)
        total_j = float(energy.sum())
        scale = self.pue / J_PER_KWH
        result_grams = float(np.dot(energy, grams)) * scale
        uncovered_j = float(np.dot(energy, uncovered))
        cost: float | None = None
        unpriced_j = 0.0
        if money is not None and unpriced is not None:
            cost = float(np.dot(energy, money)) * scale
            unpriced_j = float(np.dot(energy, unpriced))
        return Footprint(total_j, result_grams, cost, uncovered_j, unpriced_j)

    def _means(
        self, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]
    ) -> tuple[
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64] | None,
        npt.NDArray[np.float64] | None,
    ]:
        """Per interval (at least one): the time-mean intensity and the share of it without intensity data, then the
        same for the price (None without a price)."""
        lo, hi = int(starts.min()), int(max(ends.max(), starts.max() + 1))
        segments = self.segments(lo, hi)
        bounds = np.array([s.start_ns for s in segments] + [segments[-1].end_ns], dtype=np.int64)
        grams, uncovered = self._per_joule(starts, ends, bounds, [s.g_per_kwh for s in segments])
        if self.price is None:
            return grams, uncovered, None, None
        money, unpriced = self._per_joule(starts, ends, bounds, [s.price_per_kwh for s in segments])
        return grams, uncovered, money, unpriced

    @staticmethod
    def _per_joule(
        starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64], bounds: npt.NDArray[np.int64], values: list[Value]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """For each interval: the time-mean value over it (unknown pieces as 0) and the share of it unknown."""
        known = np.array([v is not None for v in values], dtype=np.float64)
        value = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
        # cumulative integrals at the boundaries, in seconds from the first boundary (small numbers, exact sums)
        widths = np.diff(bounds - bounds[0]).astype(np.float64) / 1e9
        value_integral = np.concatenate(([0.0], np.cumsum(value * widths)))
        known_integral = np.concatenate(([0.0], np.cumsum(known * widths)))
        x = (bounds - bounds[0]).astype(np.float64) / 1e9
        s = (starts - bounds[0]).astype(np.float64) / 1e9
        e = (ends - bounds[0]).astype(np.float64) / 1e9
        duration = e - s
        positive = duration > 0
        safe = np.where(positive, duration, 1.0)
        mean = (np.interp(e, x, value_integral) - np.interp(s, x, value_integral)) / safe
        covered = (np.interp(e, x, known_integral) - np.interp(s, x, known_integral)) / safe
        # zero-length intervals: the value at that instant
        index = np.clip(np.searchsorted(bounds, starts, side="right") - 1, 0, len(values) - 1)
        mean = np.where(positive, mean, value[index])
        covered = np.where(positive, covered, known[index])
        return mean, np.clip(1.0 - covered, 0.0, 1.0)

    def integrate(self, time_ns: Sequence[int] | npt.ArrayLike, cumulative_j: npt.ArrayLike) -> Footprint:
        """An energy series (Unix ns, cumulative J, time ascending) integrated against intensity and price."""
        times = np.asarray(time_ns, dtype=np.int64)
        energy = np.asarray(cumulative_j, dtype=np.float64)
        if times.size < 2:
            return Footprint(0.0, 0.0, None if self.price is None else 0.0)
        return self.integrate_intervals(times[:-1], times[1:], np.diff(energy))

    def per_interval(
        self, start_ns: npt.ArrayLike, end_ns: npt.ArrayLike, joules: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None]:
        """gCO2e and cost of each ``joules[i]`` drawn evenly over ``[start_ns[i], end_ns[i])`` (one value each, as
        ``grams_for_interval`` gives for one; energy at times without data counts as none). NaN (unknown, not 0)
        for an interval with energy and no intensity (price) data at any of its time: a stale or short series
        says nothing of it, and 0 is what a grid at 0 g/kWh gives. Cost is None without a price."""
        starts = np.asarray(start_ns, dtype=np.int64)
        ends = np.asarray(end_ns, dtype=np.int64)
        energy = np.asarray(joules, dtype=np.float64)
        if starts.size == 0:
            return np.zeros(0), None if self.price is None else np.zeros(0)
        mean_g, uncovered, mean_price, unpriced = self._means(starts, ends)
        scale = self.pue / J_PER_KWH
        grams: npt.NDArray[np.float64] = np.where((uncovered >= 1.0) & (energy != 0.0), np.nan, energy * mean_g * scale)
        if mean_price is None or unpriced is None:
            return grams, None
        cost: npt.NDArray[np.float64] = np.where(
            (unpriced >= 1.0) & (energy != 0.0), np.nan, energy * mean_price * scale
        )
        return grams, cost

    def grams_for_interval(self, start_ns: int, end_ns: int, joules: float) -> Footprint:
        """gCO2e and cost of ``joules`` used over ``[start_ns, end_ns]``, with the intensity averaged over that time
        weighted uniformly (a request's energy is taken as drawn evenly over its duration). For per-request
        results: call it with the request's start, end and energy."""
        return self.integrate_intervals([start_ns], [end_ns], [joules])


def series_from_config(config: CarbonConfig, csv: CsvWatcher | None = None) -> IntensitySeries:
    """The series ``config`` describes. With ``csv`` set, its current rows (pass a ``CsvWatcher`` kept across
    calls, so a changed file is re-read: see ``CarbonSeriesSource``)."""
    intensity: Steps
    price: Steps | None = None
    if config.csv is not None:
        watcher = csv if csv is not None else CsvWatcher(config.csv, config.price_keys)
        intensity = watcher.series.intensity
        price = watcher.series.price
    elif config.hourly_g_per_kwh is not None or config.monthly_g_per_kwh:
        intensity = ProfileSteps(config.hourly_g_per_kwh, config.monthly_g_per_kwh, config.timezone)
    else:
        intensity = ConstantSteps(config.intensity_g_per_kwh)
    if price is None:
        if config.hourly_price_per_kwh is not None or config.monthly_price_per_kwh:
            hourly = config.hourly_price_per_kwh
            if hourly is None and config.price_per_kwh is not None:
                hourly = [config.price_per_kwh] * 24
            price = ProfileSteps(hourly, config.monthly_price_per_kwh, config.timezone)
        elif config.price_per_kwh is not None:
            price = ConstantSteps(config.price_per_kwh)
    return IntensitySeries(intensity, price, pue=config.pue, currency=config.currency)


class CarbonSeriesSource:
    """Hands out the current ``IntensitySeries``, re-reading the CSV (if any) at most every
    ``csv_check_interval_s`` of the caller's monotonic clock."""

    def __init__(self, config: CarbonConfig) -> None:
        self.config = config
        self.watcher = CsvWatcher(config.csv, config.price_keys) if config.csv is not None else None
        self._series = series_from_config(config, self.watcher)
        self._checked_s: float | None = None

    @property
    def error(self) -> str | None:
        return self.watcher.error if self.watcher is not None else None

    def current(self, monotonic_s: float) -> IntensitySeries:
        if self.watcher is not None and (
            self._checked_s is None or monotonic_s - self._checked_s >= self.config.csv_check_interval_s
        ):
            self._checked_s = monotonic_s
            if self.watcher.check():
                self._series = series_from_config(self.config, self.watcher)
        return self._series
