"""Checks and deltas over all series of one kind in a batch at once, end to end in one array.

A batch holds tens of short series (10 Hz for one second); numpy calls per series would cost more than the
samples (measured: ~6 ms of a 320-sample batch went to per-series numpy overhead). So the series are joined, checked
with one numpy pass, and a failing sample is mapped back to its series only for the message.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from collector.errors import WattmeterError
from collector.store.base import Float64Array, Int64Array

MINUTE_NS = 60_000_000_000
UInt64Array = npt.NDArray[np.uint64]
Where = Callable[[int], str]  # names series i in a message


class InvalidBatch(WattmeterError):
    """The batch breaks a rule; the message says which field and how."""


class Series(Protocol):
    @property
    def time_ns(self) -> Sequence[int]: ...

    @property
    def energy_j(self) -> Sequence[float]: ...


@dataclass(frozen=True)
class Columns:
    """Series ``i`` is ``time_ns[offsets[i]:offsets[i + 1]]`` (and the same of ``energy_j``)."""

    offsets: list[int]
    time_ns: Int64Array
    energy_j: Float64Array

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def size(self, index: int) -> int:
        return self.offsets[index + 1] - self.offsets[index]

    def sizes(self) -> Int64Array:
        return np.diff(np.asarray(self.offsets, dtype=np.int64)).astype(np.int64, copy=False)

    def slice(self, index: int) -> tuple[Int64Array, Float64Array]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.time_ns[start:end], self.energy_j[start:end]


def _series_of(offsets: list[int], position: int) -> int:
    return int(np.searchsorted(np.asarray(offsets), position, side="right")) - 1


def gather(series: Sequence[Series], where: Callable[[int], str], latest_ns: int) -> Columns:
    """Join the series of parsed messages and ``check`` them (``where(i)`` names series ``i`` in messages)."""
    offsets = [0]
    for index, one in enumerate(series):
        count = len(one.time_ns)
        if len(one.energy_j) != count:
            raise InvalidBatch(f"{where(index)}: {len(one.energy_j)} energy_j values for {count} time_ns values")
        offsets.append(offsets[-1] + count)
    total = offsets[-1]
    times = np.fromiter(itertools.chain.from_iterable(s.time_ns for s in series), dtype=np.uint64, count=total)
    energy = np.fromiter(itertools.chain.from_iterable(s.energy_j for s in series), dtype=np.float64, count=total)
    return check(offsets, times, energy, where, latest_ns)


def check(
    offsets: list[int], times: UInt64Array, energy: Float64Array, where: Callable[[int], str], latest_ns: int
) -> Columns:
    """Check joined series (series ``i`` is ``[offsets[i]:offsets[i + 1]]``; times as sent, unsigned): time_ns in
    (0, latest_ns] and strictly ascending, energy_j finite, >= 0 and never going back. ``where(i)`` names series
    ``i`` in the message of the ``InvalidBatch`` raised."""
    total = offsets[-1]
    if total == 0:
        return Columns(offsets, times.astype(np.int64), energy)

    def fail(mask: npt.NDArray[np.bool_], message: Callable[[int], str]) -> None:
        position = int(np.flatnonzero(mask)[0])
        raise InvalidBatch(f"{where(_series_of(offsets, position))}: {message(position)}")

    if not bool(times.all()):
        fail(times == 0, lambda _: "time_ns 0 (times are Unix epoch nanoseconds)")
    late = times > np.uint64(latest_ns)
    if bool(late.any()):
        fail(late, lambda p: f"time_ns {int(times[p])} is more than max_future_s ahead of the aggregator's clock "
             "(is the agent's clock right?)")  # fmt: skip
    signed = times.astype(np.int64)
    finite = np.isfinite(energy)
    if not bool(finite.all()):
        fail(~finite, lambda _: "energy_j not finite (NaN or infinity)")
    negative = energy < 0
    if bool(negative.any()):
        fail(negative, lambda p: f"energy_j negative ({float(energy[p])!r})")
    if total > 1:
        # a pair across two series is not a step of either
        within = np.ones(total - 1, dtype=bool)
        within[[start - 1 for start in offsets[1:-1] if 0 < start < total]] = False
        not_ascending = (signed[1:] <= signed[:-1]) & within
        if bool(not_ascending.any()):
            fail(np.r_[False, not_ascending], lambda _: "time_ns not strictly ascending")
        backwards = (energy[1:] < energy[:-1]) & within
        if bool(backwards.any()):
            fail(
                np.r_[False, backwards],
                lambda _: "energy_j goes backwards (a cumulative counter never does within an instance)",
            )
    return Columns(offsets, signed, energy)


def within_deltas(columns: Columns) -> Float64Array:
    """Joules each sample adds over the previous sample of its series; a series' first sample adds nothing here
    (its step from the series' last stored sample is the caller's, who knows that sample)."""
    energy = columns.energy_j
    out = np.empty_like(energy)
    if len(energy) == 0:
        return out
    out[1:] = energy[1:] - energy[:-1]
    out[np.asarray(columns.offsets[:-1])[columns.sizes() > 0]] = 0.0
    return out


def minute_sums(columns: Columns, joules: Float64Array) -> list[tuple[int, int, float]]:
    """(series index, minute start ns, joules) for each minute each series has samples in, in order."""
    total = len(columns.time_ns)
    if total == 0:
        return []
    minutes = columns.time_ns // MINUTE_NS
    series = np.repeat(np.arange(len(columns)), np.diff(np.asarray(columns.offsets)))
    change = np.ones(total, dtype=bool)
    change[1:] = (series[1:] != series[:-1]) | (minutes[1:] != minutes[:-1])
    starts = np.flatnonzero(change)
    sums = np.add.reduceat(joules, starts)
    return list(zip(series[starts].tolist(), (minutes[starts] * MINUTE_NS).tolist(), sums.tolist(), strict=True))
