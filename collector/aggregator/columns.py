"""Checks and deltas over all series of one kind in a batch at once, end to end in one array.

A batch holds tens of short series (10 Hz for one second); numpy calls per series would cost more than the
samples (measured: ~6 ms of a 320-sample batch went to per-series numpy overhead). So the series are joined, checked
with one numpy pass, and a failing sample is mapped back to its series only for the message. Where the series lie
in the joined arrays (``Segments``) depends only on their lengths, so it is worked out once for batches alike.
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
BoolArray = npt.NDArray[np.bool_]
Where = Callable[[int], str]  # names series i in a message


class InvalidBatch(WattmeterError):
    """The batch breaks a rule; the message says which field and how."""


class Series(Protocol):
    @property
    def time_ns(self) -> Sequence[int]: ...

    @property
    def energy_j(self) -> Sequence[float]: ...


@dataclass(frozen=True)
class Segments:
    """Series ``i`` is ``[offsets[i]:offsets[i + 1]]`` of the joined arrays."""

    offsets: list[int]
    present: list[int]  # the series with samples
    firsts: Int64Array  # their first positions
    lasts: Int64Array  # their last positions
    within: BoolArray  # per pair of neighbouring samples: both of one series (a pair across two is not a step)
    series: Int64Array  # per sample: its series

    @classmethod
    def of(cls, counts: Sequence[int]) -> Segments:
        offsets = [0, *itertools.accumulate(counts)]
        present = [i for i, count in enumerate(counts) if count]
        total = offsets[-1]
        within = np.ones(max(total - 1, 0), dtype=bool)
        within[[start - 1 for start in offsets[1:-1] if 0 < start < total]] = False
        return cls(
            offsets,
            present,
            np.array([offsets[i] for i in present], dtype=np.int64),
            np.array([offsets[i + 1] - 1 for i in present], dtype=np.int64),
            within,
            np.repeat(np.arange(len(counts), dtype=np.int64), np.asarray(counts, dtype=np.int64)),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def size(self, index: int) -> int:
        return self.offsets[index + 1] - self.offsets[index]

    def series_of(self, position: int) -> int:
        return int(self.series[position])


@dataclass(frozen=True)
class Columns:
    """Joined series, checked: series ``i`` is ``time_ns[offsets[i]:offsets[i + 1]]`` (and the same of energy)."""

    segments: Segments
    time_ns: Int64Array
    energy_j: Float64Array

    @property
    def offsets(self) -> list[int]:
        return self.segments.offsets

    def __len__(self) -> int:
        return len(self.segments)

    def size(self, index: int) -> int:
        return self.segments.size(index)

    def slice(self, index: int) -> tuple[Int64Array, Float64Array]:
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.time_ns[start:end], self.energy_j[start:end]


def gather(series: Sequence[Series], where: Where, latest_ns: int) -> Columns:
    """Join the series of parsed messages and ``check`` them (``where(i)`` names series ``i`` in messages)."""
    counts = [len(one.time_ns) for one in series]
    for index, (one, count) in enumerate(zip(series, counts, strict=True)):
        if len(one.energy_j) != count:
            raise InvalidBatch(f"{where(index)}: {len(one.energy_j)} energy_j values for {count} time_ns values")
    total = sum(counts)
    times = np.fromiter(itertools.chain.from_iterable(s.time_ns for s in series), dtype=np.uint64, count=total)
    energy = np.fromiter(itertools.chain.from_iterable(s.energy_j for s in series), dtype=np.float64, count=total)
    return check(Segments.of(counts), times, energy, where, latest_ns)


def check(segments: Segments, times: UInt64Array, energy: Float64Array, where: Where, latest_ns: int) -> Columns:
    """Check joined series (times as sent, unsigned): time_ns in (0, latest_ns] and strictly ascending, energy_j
    finite, >= 0 and never going back. ``where(i)`` names series ``i`` in the ``InvalidBatch`` raised."""
    if len(times) == 0:
        return Columns(segments, times.astype(np.int64), energy)

    def fail(mask: BoolArray, message: Callable[[int], str]) -> None:
        position = int(np.flatnonzero(mask)[0])
        raise InvalidBatch(f"{where(segments.series_of(position))}: {message(position)}")

    if not times.all():
        fail(times == 0, lambda _: "time_ns 0 (times are Unix epoch nanoseconds)")
    if times.max() > latest_ns:
        late = times > np.uint64(latest_ns)
        fail(late, lambda p: f"time_ns {int(times[p])} is more than max_future_s ahead of the aggregator's clock "
             "(is the agent's clock right?)")  # fmt: skip
    signed = times.astype(np.int64)
    finite = np.isfinite(energy)
    if not finite.all():
        fail(~finite, lambda _: "energy_j not finite (NaN or infinity)")
    if energy.min() < 0:
        fail(energy < 0, lambda p: f"energy_j negative ({float(energy[p])!r})")
    if len(times) > 1:
        within = segments.within
        not_ascending = (signed[1:] <= signed[:-1]) & within
        if not_ascending.any():
            fail(np.r_[False, not_ascending], lambda _: "time_ns not strictly ascending")
        backwards = (energy[1:] < energy[:-1]) & within
        if backwards.any():
            fail(
                np.r_[False, backwards],
                lambda _: "energy_j goes backwards (a cumulative counter never does within an instance)",
            )
    return Columns(segments, signed, energy)


def within_deltas(columns: Columns) -> Float64Array:
    """Joules each sample adds over the previous sample of its series; a series' first sample adds nothing here
    (its step from the series' last stored sample is the caller's, who knows that sample)."""
    energy = columns.energy_j
    out = np.empty_like(energy)
    if len(energy) == 0:
        return out
    out[1:] = energy[1:] - energy[:-1]
    out[columns.segments.firsts] = 0.0
    return out


def minute_arrays(columns: Columns, joules: Float64Array) -> tuple[Int64Array, Int64Array, Float64Array]:
    """For each minute each series has samples in, in order: its series, the minute's start (ns), the joules."""
    total = len(columns.time_ns)
    if total == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    minutes = columns.time_ns // MINUTE_NS
    change = np.empty(total, dtype=bool)
    change[0] = True
    np.logical_or(~columns.segments.within, minutes[1:] != minutes[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    return columns.segments.series[starts], minutes[starts] * MINUTE_NS, np.add.reduceat(joules, starts)


def minute_sums(columns: Columns, joules: Float64Array) -> list[tuple[int, int, float]]:
    """(series index, minute start ns, joules) for each minute each series has samples in, in order."""
    series, minutes, sums = minute_arrays(columns, joules)
    return list(zip(series.tolist(), minutes.tolist(), sums.tolist(), strict=True))
