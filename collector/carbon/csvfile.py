"""The ``[carbon] csv`` time series: ``timestamp,g_per_kwh[,price_per_kwh]``, one row per step, re-read on change.

Timestamps are ISO 8601 with a UTC offset or ``Z`` (``2027-03-28T03:00:00+02:00``): a local time without an offset
is refused, because around a DST change it names two instants or none. Rows must be in time order, one per step
(the step is the time between the first two rows; a longer distance is a gap, and a gap is an error rather than a
value made up for it). Each row's values hold until the next row; the last row's for one step.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from collector.carbon.steps import TableSteps
from collector.errors import ConfigError

log = logging.getLogger(__name__)

NS = 10**9
HEADER = "timestamp,g_per_kwh[,price_per_kwh]"


@dataclass(frozen=True)
class CsvSeries:
    intensity: TableSteps
    price: TableSteps | None  # None: the file has no price column


def _timestamp_ns(text: str, where: str) -> int:
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an ISO 8601 timestamp (like 2027-03-28T03:00:00+02:00)") from None
    if stamp.tzinfo is None:
        raise ConfigError(
            f"{where}: timestamp {text!r} has no UTC offset; write it with one (+02:00) or in UTC (Z): "
            "a local time is ambiguous around DST changes"
        )
    return int(stamp.timestamp()) * NS + stamp.microsecond * 1000


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: {what} is {text}; it must be finite and 0 or more")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _duration(ns: int) -> str:
    seconds = ns / NS
    return (
        f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
    )


def parse_csv(text: str, name: str = "csv") -> CsvSeries:
    """Parse the series; raises ``ConfigError`` naming the file, line and fix for the first problem found."""
    times: list[int] = []
    intensities: list[float] = []
    prices: list[float] = []
    lines: list[int] = []
    columns: int | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split(",")]
        if fields[0].lower() == "timestamp" and not times:
            continue  # header
        where = f"{name} line {number}"
        if not times and not _is_number(fields[-1]) and not fields[0][:1].isdigit():
            raise ConfigError(f"{where}: header {line!r}: the header, if any, must be {HEADER}")
        if len(fields) not in (2, 3):
            raise ConfigError(f"{where}: {len(fields)} fields; expected timestamp,g_per_kwh[,price_per_kwh]")
        if columns is None:
            columns = len(fields)
        elif len(fields) != columns:
            raise ConfigError(
                f"{where}: {len(fields)} fields where earlier rows have {columns}; give every row a price or none"
            )
        t_ns = _timestamp_ns(fields[0], where)
        if times:
            previous = times[-1]
            if t_ns == previous:
                raise ConfigError(f"{where}: timestamp {fields[0]} repeats line {lines[-1]}'s")
            if t_ns < previous:
                raise ConfigError(f"{where}: timestamp {fields[0]} is before line {lines[-1]}'s; sort the rows by time")
        times.append(t_ns)
        lines.append(number)
        intensities.append(_number(fields[1], "g_per_kwh", where))
        if len(fields) == 3:
            prices.append(_number(fields[2], "price_per_kwh", where))
    if len(times) < 2:
        raise ConfigError(f"{name}: {len(times)} data rows; at least 2 are needed (the step is the time between rows)")
    step = times[1] - times[0]
    for i in range(2, len(times)):
        if times[i] - times[i - 1] != step:
            # which distance is the wrong one the file cannot say: name both
            raise ConfigError(
                f"{name}: rows are not evenly spaced: line {lines[1]} is {_duration(step)} after line {lines[0]}, "
                f"but line {lines[i]} is {_duration(times[i] - times[i - 1])} after line {lines[i - 1]}; give one "
                "row per step, with no gaps"
            )
    price = TableSteps(times, prices, step) if prices else None
    return CsvSeries(TableSteps(times, intensities, step), price)


def read_csv(path: Path, price_keys: Sequence[str] = ()) -> CsvSeries:
    """The file's series. ``price_keys``: the [carbon] price keys set beside it; a price column with any of them
    is refused (one of the two would be ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file ([carbon] csv)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    series = parse_csv(text, str(path))
    if series.price is not None and price_keys:
        keys = " and ".join(price_keys)
        raise ConfigError(
            f"{path}: has a price_per_kwh column and [carbon] sets {keys} too, which the column would override: "
            f"keep one (remove {keys}, or drop the column)"
        )
    return series


class CsvWatcher:
    """The file's series, re-read when its mtime or size changes (a ``stat`` per check). A change that does not
    parse keeps the series already read, and ``error`` says why."""

    def __init__(self, path: Path, price_keys: Sequence[str] = ()) -> None:
        self.path = path
        self.price_keys = tuple(price_keys)
        self.series = read_csv(
            path, self.price_keys
        )  # the first read must succeed: a config with no intensity data is refused
        self._signature = self._stat()
        self.error: str | None = None
        self.reloads = 0

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def check(self) -> bool:
        """Re-read the file if it changed; True when a new series was taken."""
        signature = self._stat()
        if signature is None:
            if self.error is None:
                log.error("[carbon] csv %s: cannot stat it; keeping the series read before", self.path)
            self.error = f"{self.path}: missing or unreadable"
            return False
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            self.series = read_csv(self.path, self.price_keys)
        except ConfigError as exc:
            self.error = str(exc)
            log.error("[carbon] csv changed but is invalid, keeping the series read before: %s", exc)
            return False
        self.error = None
        self.reloads += 1
        return True
