"""The shift advisor: what moving flexible work to the lowest-intensity hours would have saved.

Model (stated in the report): a flexible workload's energy, hour by hour from the rollups, is a set of hour-long
blocks. Inside each window (``--window``, aligned to the report's start) its blocks may be moved to any hours of
the same window, one block per hour, so the work keeps its hours and its peak power and only their order changes.
The schedule that minimises emissions puts the largest block in the cleanest hour, the next in the next cleanest,
and so on (the rearrangement inequality makes that optimal). The saving is what the work emitted minus what that
schedule would have emitted, at the intensity each hour actually had; the cost change is that schedule's, which
may be a loss when price and carbon disagree.

Nothing is claimed the data cannot show: a constant intensity, no flexible workload, less data than one window, or
hours without intensity data each give a reason instead of a number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from collector.carbon.series import J_PER_KWH, IntensitySeries
from collector.report.rates import hourly_rates


@dataclass(frozen=True)
class Move:
    """One hour-block of work: run at ``to_ns`` instead of ``from_ns`` (hour starts, Unix ns)."""

    from_ns: int
    to_ns: int
    energy_kwh: float
    from_g_per_kwh: float
    to_g_per_kwh: float


@dataclass(frozen=True)
class WorkloadShift:
    workload: str  # "host/workload/phase/job"
    energy_kwh: float
    actual_kg: float
    shifted_kg: float
    actual_cost: float | None
    shifted_cost: float | None
    moves: list[Move] = field(default_factory=list)

    @property
    def saved_kg(self) -> float:
        return self.actual_kg - self.shifted_kg

    @property
    def saved_cost(self) -> float | None:
        if self.actual_cost is None or self.shifted_cost is None:
            return None
        return self.actual_cost - self.shifted_cost


@dataclass(frozen=True)
class ShiftAdvice:
    window_s: float
    windows: int  # whole windows in the period
    workloads: list[WorkloadShift]
    reason: str = ""  # set when nothing can be said, or to qualify what is
    notes: list[str] = field(default_factory=list)

    @property
    def saved_kg(self) -> float:
        return sum(w.saved_kg for w in self.workloads)

    @property
    def saved_cost(self) -> float | None:
        costs = [w.saved_cost for w in self.workloads]
        if not costs or any(c is None for c in costs):
            return None
        return sum(c for c in costs if c is not None)


def advise(
    series: IntensitySeries,
    hour_starts: npt.NDArray[np.int64],
    energy_j: Mapping[str, Sequence[float] | npt.NDArray[np.float64]],
    window_s: float,
) -> ShiftAdvice:
    """``energy_j``: per flexible workload, its joules in each hour of ``hour_starts`` (consecutive hours)."""
    window_hours = int(window_s // 3600)
    if window_hours < 2 or window_s % 3600:
        return ShiftAdvice(window_s, 0, [], reason="the window must be a whole number of hours, 2 or more")
    windows = len(hour_starts) // window_hours
    if not energy_j:
        return ShiftAdvice(
            window_s,
            windows,
            [],
            reason="no flexible workload in the period (phase training, a flexible=true label, or --flexible REGEX)",
        )
    if series.constant:
        return ShiftAdvice(window_s, windows, [], reason="no saving possible: intensity is constant")
    if windows == 0:
        return ShiftAdvice(
            window_s,
            0,
            [],
            reason=f"too little data: the period holds {len(hour_starts)} h, less than one {window_hours} h window",
        )
    rates = hourly_rates(series, hour_starts)
    grams = rates.grams_per_kwh
    prices = rates.price_per_kwh
    known = rates.known
    notes = []
    usable = []
    for w in range(windows):
        part = slice(w * window_hours, (w + 1) * window_hours)
        if known[part].all():
            usable.append(part)
    skipped = windows - len(usable)
    if skipped:
        notes.append(f"{skipped} of {windows} windows left out: hours without intensity or price data")
    if not usable:
        return ShiftAdvice(window_s, windows, [], reason="no window has intensity data for every hour", notes=notes)
    leftover = len(hour_starts) - windows * window_hours
    if leftover:
        notes.append(f"the last {leftover} h (less than a window) are not considered")
    results = []
    for name in sorted(energy_j):
        kwh = np.asarray(energy_j[name], dtype=np.float64) / J_PER_KWH
        actual_kg = shifted_kg = 0.0
        actual_cost = shifted_cost = 0.0
        moves: list[Move] = []
        used = 0.0
        for part in usable:
            blocks = kwh[part]
            g = grams[part]
            used += float(blocks.sum())
            by_energy = np.argsort(-blocks, kind="stable")
            by_intensity = np.argsort(g, kind="stable")
            target = np.empty_like(by_energy)
            target[by_energy] = by_intensity  # block i goes to hour target[i]
            actual_kg += float(np.dot(blocks, g)) / 1000
            shifted_kg += float(np.dot(blocks, g[target])) / 1000
            if prices is not None:
                price = prices[part]
                actual_cost += float(np.dot(blocks, price))
                shifted_cost += float(np.dot(blocks, price[target]))
            starts = hour_starts[part]
            for i in np.flatnonzero(blocks > 0).tolist():
                if g[target[i]] < g[i]:
                    moves.append(Move(int(starts[i]), int(starts[target[i]]), float(blocks[i]), g[i], g[target[i]]))
        if used <= 0:
            continue
        results.append(
            WorkloadShift(
                name,
                used,
                actual_kg,
                shifted_kg,
                actual_cost if prices is not None else None,
                shifted_cost if prices is not None else None,
                moves,
            )
        )
    if not results:
        return ShiftAdvice(window_s, windows, [], reason="the flexible workloads used no energy in whole windows")
    return ShiftAdvice(window_s, windows, results, notes=notes)
