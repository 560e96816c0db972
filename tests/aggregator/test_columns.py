"""Checks over joined series: a problem is blamed on the right series, and series boundaries are not steps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from collector.aggregator.columns import MINUTE_NS, InvalidBatch, gather, minute_sums, within_deltas

LATEST = 10**18


@dataclass
class S:
    time_ns: list[int] = field(default_factory=list)
    energy_j: list[float] = field(default_factory=list)


def where(index: int) -> str:
    return f"series {index}"


def test_boundaries_are_not_steps_and_empty_series_keep_their_place() -> None:
    joined = gather([S([5, 6], [9.0, 10.0]), S(), S([1, 2, 3], [0.0, 0.0, 1.0])], where, LATEST)
    assert joined.offsets == [0, 2, 2, 5]
    assert joined.slice(1)[0].tolist() == []
    assert joined.slice(2)[1].tolist() == [0.0, 0.0, 1.0]
    steps = within_deltas(joined)
    assert steps.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]  # a series' first sample adds nothing (across: not a step)


@pytest.mark.parametrize(
    ("series", "words"),
    [
        ([S([1], [1.0]), S([2, 2], [1.0, 2.0])], "series 1: time_ns not strictly ascending"),
        ([S([1, 2], [1.0, 2.0]), S([3, 4], [5.0, 4.0])], "series 1: energy_j goes backwards"),
        ([S([1], [1.0]), S(), S([1], [math.nan])], "series 2: energy_j not finite"),
        ([S([1], [-0.5])], "series 0: energy_j negative (-0.5)"),
        ([S([1, 0], [1.0, 2.0])], "series 0: time_ns 0"),
        ([S([1], [1.0]), S([LATEST + 1], [1.0])], f"series 1: time_ns {LATEST + 1} is more than max_future_s"),
        ([S([1, 2], [1.0])], "series 0: 1 energy_j values for 2 time_ns values"),
    ],
)
def test_problems_are_blamed_on_their_series(series: list[S], words: str) -> None:
    with pytest.raises(InvalidBatch) as raised:
        gather(series, where, LATEST)
    assert words in str(raised.value)


def test_minute_sums_per_series_and_minute() -> None:
    m = MINUTE_NS
    joined = gather([S([m - 1, m, m + 1], [0.0, 2.0, 5.0]), S([m + 2], [7.0])], where, LATEST)
    sums = minute_sums(joined, within_deltas(joined))
    assert sums == [(0, 0, 0.0), (0, m, 5.0), (1, m, 0.0)]
