"""Step functions of time: a value (gCO2e/kWh or a price per kWh) that holds over stretches of time.

Each ``Steps`` answers ``steps(start_ns, end_ns)`` with ``(boundaries, values)``: ``boundaries[0] == start_ns``,
``boundaries[-1] == end_ns``, value i holding on ``[boundaries[i], boundaries[i+1])``; None where the value is not
known (outside a CSV series' rows). Times are Unix ns.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from collector.carbon.config import MONTHS

# Local hours begin on UTC quarter hours in every zone in use (offsets are whole quarter hours), so evaluating a
# profile at each UTC quarter hour finds every local hour boundary, DST changes included.
QUARTER_NS = 900 * 10**9

Value = float | None
StepList = tuple[list[int], list[Value]]


class Steps(abc.ABC):
    @abc.abstractmethod
    def steps(self, start_ns: int, end_ns: int) -> StepList:
        """The value's steps covering ``[start_ns, end_ns)``; adjacent equal values are merged."""

    @property
    def constant(self) -> bool:
        """True when the value is the same at every time (nothing can be gained by moving work)."""
        return False

    def at(self, t_ns: int) -> Value:
        return self.steps(t_ns, t_ns + 1)[1][0]


class ConstantSteps(Steps):
    def __init__(self, value: float) -> None:
        self.value = value

    def steps(self, start_ns: int, end_ns: int) -> StepList:
        return [start_ns, end_ns], [self.value]

    @property
    def constant(self) -> bool:
        return True


class ProfileSteps(Steps):
    """24 values for local hours 0-23 in ``zone`` (DST applies: a 23- or 25-hour day has 23 or 25 steps), with
    ``monthly`` (jan..dec) overriding ``hourly`` for the months it names."""

    def __init__(self, hourly: Sequence[float] | None, monthly: Mapping[str, Sequence[float]], zone: str) -> None:
        self.zone = ZoneInfo(zone)
        self.by_month: list[Sequence[float] | None] = [monthly.get(month, hourly) for month in MONTHS]

    def value_at(self, t_ns: int) -> Value:
        local = datetime.fromtimestamp(t_ns // 10**9, tz=timezone.utc).astimezone(self.zone)
        profile = self.by_month[local.month - 1]
        return None if profile is None else float(profile[local.hour])

    def steps(self, start_ns: int, end_ns: int) -> StepList:
        boundaries = [start_ns]
        values = [self.value_at(start_ns)]
        mark = (start_ns // QUARTER_NS + 1) * QUARTER_NS
        while mark < end_ns:
            value = self.value_at(mark)
            if value != values[-1]:
                boundaries.append(mark)
                values.append(value)
            mark += QUARTER_NS
        boundaries.append(end_ns)
        return boundaries, values

    @property
    def constant(self) -> bool:
        seen = {value for profile in self.by_month if profile is not None for value in profile}
        return len(seen) <= 1 and all(profile is not None for profile in self.by_month)


class TableSteps(Steps):
    """Rows of a time series: value i holds from ``times_ns[i]`` to ``times_ns[i+1]``, the last one for ``step_ns``."""

    def __init__(self, times_ns: Sequence[int], values: Sequence[float], step_ns: int) -> None:
        self.times_ns = list(times_ns)
        self.values = list(values)
        self.step_ns = step_ns
        self.end_ns = self.times_ns[-1] + step_ns if self.times_ns else 0

    def steps(self, start_ns: int, end_ns: int) -> StepList:
        boundaries = [start_ns]
        values: list[Value] = []
        if not self.times_ns or end_ns <= self.times_ns[0] or start_ns >= self.end_ns:
            return [start_ns, end_ns], [None]
        index = bisect.bisect_right(self.times_ns, start_ns) - 1
        values.append(None if index < 0 else self.values[index])
        index += 1
        while index < len(self.times_ns) and self.times_ns[index] < end_ns:
            value = self.values[index]
            if value != values[-1]:
                boundaries.append(self.times_ns[index])
                values.append(value)
            index += 1
        if self.end_ns < end_ns and values[-1] is not None:
            boundaries.append(self.end_ns)
            values.append(None)
        boundaries.append(end_ns)
        return boundaries, values

    @property
    def constant(self) -> bool:
        return len(set(self.values)) <= 1


def merge(first: StepList, second: StepList) -> tuple[list[int], list[Value], list[Value]]:
    """Two step lists over the same span as one: the union of their boundaries, each value looked up."""
    b1, v1 = first
    b2, v2 = second
    boundaries = sorted(set(b1) | set(b2))
    out1: list[Value] = []
    out2: list[Value] = []
    i = j = 0
    for start in boundaries[:-1]:
        while b1[i + 1] <= start:
            i += 1
        while b2[j + 1] <= start:
            j += 1
        out1.append(v1[i])
        out2.append(v2[j])
    return boundaries, out1, out2
