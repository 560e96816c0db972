"""Split each device's measured energy among the workloads on the host, and accumulate it for export.

The rule: for every device and every interval between two of its readings, the joules given to workloads plus
the joules given to ``IDLE`` (GPUs) or ``SYSTEM`` (CPU and DRAM domains) equal the device's own energy delta,
floating point aside. Nothing here reads /proc or NVML: callers hand in the shares found at a process scan, and the
device readings; keys are whatever hashable workload key the caller uses.

Units: energy in joules, power in watts, times in seconds (``now_s``: any monotonic clock in seconds).

GPU rule (``split_gpu_interval``), in this order:

1. no process on the GPU: all its energy is ``IDLE``;
2. one workload key on it (one process, or several of the same key): that key gets all of it;
3. several: split by per-process SM utilisation, when every process reports one and their sum is above 0;
4. else by used GPU memory, when every process reports it and their sum is above 0;
5. else equally per process.

Processes of the same key add up. Once a GPU has a process, no energy goes to ``IDLE``: the workloads on it pay
for its idle power too.

CPU rule (``split_cpu_interval``): each key gets ``energy * its_ticks / total_ticks``; the remainder (kernel,
processes too short-lived to be seen by a scan, idle) is ``SYSTEM``. Process ticks are read over a slightly
different window than the total, so when they add up to more than the total they are scaled down to exactly the
energy and ``SYSTEM`` gets 0.

The share found at one scan holds until the next (``DeviceSplitter``), so a workload's energy series keeps the
device's own time resolution.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from collector.readings import DeviceKind, DeviceReading, GpuProcess

K = TypeVar("K", bound=Hashable)


class SpecialKey:
    """A key that is not a workload: ``IDLE``, ``SYSTEM``, ``OTHER``.

    A distinct type, not the strings ``"idle"``/``"system"``/``"other"``, so that a workload a user names ``idle``
    can never be mixed up with the GPU's idle energy. ``str()`` gives the label value to export (``name``).

    Interned: ``SpecialKey(name)`` is always the same object for a name, so equality and hashing are by identity,
    which the interpreter does without calling Python code (these keys are hashed several times per reading).
    """

    __slots__ = ("name",)
    name: str
    _interned: ClassVar[dict[str, SpecialKey]] = {}

    def __new__(cls, name: str) -> SpecialKey:
        existing = cls._interned.get(name)
        if existing is not None:
            return existing
        key = super().__new__(cls)
        object.__setattr__(key, "name", name)
        cls._interned[name] = key
        return key

    def __setattr__(self, attribute: str, value: object) -> None:
        raise AttributeError(f"SpecialKey is immutable: cannot set {attribute}")

    def __reduce__(self) -> tuple[type[SpecialKey], tuple[str]]:
        return (SpecialKey, (self.name,))

    def __repr__(self) -> str:
        return f"SpecialKey({self.name!r})"

    def __str__(self) -> str:
        return self.name


IDLE = SpecialKey("idle")
"""A GPU's energy while no process runs on it."""
SYSTEM = SpecialKey("system")
"""A CPU or DRAM domain's energy not found in any workload's CPU time: kernel, short-lived processes, idle."""
OTHER = SpecialKey("other")
"""Workloads folded together past ``WorkloadEnergy.max_series``."""


@dataclass(frozen=True, slots=True)
class ProcessShare(Generic[K]):
    """One process on a GPU at a scan: its workload key and what it uses.

    ``sm_utilization`` is a ratio (0-1; values above 1 are taken as relative weights), None when not reported.
    ``used_memory_bytes`` is the GPU memory it holds in bytes, None when not reported. A negative or non-finite
    value counts as not reported.
    """

    key: K
    sm_utilization: float | None = None
    used_memory_bytes: int | None = None


def gpu_process_shares(processes: Sequence[GpuProcess], key_of: Callable[[GpuProcess], K]) -> list[ProcessShare[K]]:
    """``ProcessShare`` for each ``GpuProcess`` of a ``DeviceStatus``, keyed by ``key_of(process)``."""
    return [ProcessShare(key_of(p), p.sm_utilization_ratio, p.used_memory_bytes) for p in processes]


def _check_energy(energy_j: float) -> None:
    if not math.isfinite(energy_j) or energy_j < 0:
        raise ValueError(f"energy must be finite and not negative, got {energy_j!r} J")


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


def _gpu_weights(processes: Sequence[ProcessShare[K]]) -> list[float]:
    """Per-process weights, by the rule order in the module docstring (utilisation, memory, equal)."""
    if all(_usable(p.sm_utilization) for p in processes):
        utils = [float(p.sm_utilization or 0.0) for p in processes]
        if sum(utils) > 0:
            return utils
    if all(_usable(p.used_memory_bytes) for p in processes):
        memory = [float(p.used_memory_bytes or 0) for p in processes]
        if sum(memory) > 0:
            return memory
    return [1.0] * len(processes)


def split_gpu_interval(energy_j: float, processes: Sequence[ProcessShare[K]]) -> tuple[dict[K, float], float]:
    """Split one GPU interval's energy (joules) among the processes found on it.

    Returns (joules per key, idle joules). Rule order: no process -> all idle; one key -> all to it; else by SM
    utilisation when every process reports it and the sum is above 0, else by used memory under the same
    condition, else equally per process. Processes of the same key add up. With any process, idle is 0.

    Raises ValueError when ``energy_j`` is negative or not finite.
    """
    _check_energy(energy_j)
    if not processes:
        return {}, energy_j
    first = processes[0].key
    if all(p.key == first for p in processes):
        return {first: energy_j}, 0.0
    weights = _gpu_weights(processes)
    weights_total = sum(weights)
    shares: dict[K, float] = {}
    for process, weight in zip(processes, weights, strict=True):
        # The ratio first: energy / a subnormal sum of weights would overflow.
        shares[process.key] = shares.get(process.key, 0.0) + energy_j * (weight / weights_total)
    return shares, 0.0


def split_cpu_interval(
    energy_j: float, cpu_ticks_by_key: Mapping[K, float], total_ticks: float
) -> tuple[dict[K, float], float]:
    """Split one CPU (or DRAM) interval's energy (joules) by CPU time.

    ``cpu_ticks_by_key`` is the CPU time each key used over the scan window, ``total_ticks`` the CPU time the host
    had over it (any one unit: ticks, seconds). Returns (joules per key, system joules): each key gets
    ``energy * ticks / total_ticks`` and the rest is system. When the keys' ticks add up to more than
    ``total_ticks`` (counted over a slightly different window) they are scaled down to exactly ``energy_j`` and
    system is 0. ``total_ticks <= 0``: all system. Negative ticks count as 0.

    Raises ValueError when ``energy_j`` is negative or not finite, or any ticks value is not finite.
    """
    _check_energy(energy_j)
    if not math.isfinite(total_ticks):
        raise ValueError(f"total_ticks must be finite, got {total_ticks!r}")
    ticks: dict[K, float] = {}
    for key, value in cpu_ticks_by_key.items():
        if not math.isfinite(value):
            raise ValueError(f"cpu ticks must be finite, got {value!r} for {key!r}")
        ticks[key] = max(0.0, float(value))
    if total_ticks <= 0:
        return dict.fromkeys(ticks, 0.0), energy_j
    keys_total = sum(ticks.values())
    if keys_total > total_ticks:
        return {key: energy_j * (value / keys_total) for key, value in ticks.items()}, 0.0
    shares = {key: energy_j * (value / total_ticks) for key, value in ticks.items()}
    return shares, max(0.0, energy_j - sum(shares.values()))


@dataclass(frozen=True, slots=True)
class _Shares(Generic[K]):
    """A device's split of one joule: fraction per key, and the fraction left to ``rest_key``."""

    fractions: dict[K, float]
    rest_fraction: float
    rest_key: SpecialKey


class DeviceSplitter(Generic[K]):
    """Per device, the shares found at the last process scan, applied to each energy reading until the next scan.

    ``on_reading`` turns a device's cumulative ``energy_j`` into the joules used since its previous reading and
    splits them with the device's current shares. A device without shares yet gives all its energy to ``IDLE``,
    or to ``SYSTEM`` once ``add_device`` said it is a CPU or DRAM domain.
    """

    def __init__(self) -> None:
        self._shares: dict[str, _Shares[K]] = {}
        self._last_energy_j: dict[str, float] = {}

    def add_device(self, device_id: str, kind: DeviceKind) -> None:
        """Declare a device with no shares yet: a GPU's energy goes to ``IDLE``, a CPU's or DRAM's to ``SYSTEM``.

        Shares a scan already set for the device stay.
        """
        rest_key = IDLE if kind is DeviceKind.GPU else SYSTEM
        self._shares.setdefault(device_id, _Shares({}, 1.0, rest_key))

    def baseline_j(self, device_id: str) -> float | None:
        """The energy of the device's last reading taken in (joules), or None before its first."""
        return self._last_energy_j.get(device_id)

    def rebase(self, device_id: str) -> None:
        """Forget the device's last energy: its next reading is a new baseline (another source took it over)."""
        self._last_energy_j.pop(device_id, None)

    def set_gpu_shares(self, device_id: str, processes: Sequence[ProcessShare[K]]) -> None:
        """The processes found on a GPU at a scan; they hold until the next call (see ``split_gpu_interval``)."""
        fractions, idle = split_gpu_interval(1.0, processes)
        self._shares[device_id] = _Shares(fractions, idle, IDLE)

    def set_cpu_shares(self, device_id: str, cpu_ticks_by_key: Mapping[K, float], total_ticks: float) -> None:
        """The CPU time per key over a scan window, for a CPU or DRAM domain (see ``split_cpu_interval``)."""
        fractions, system = split_cpu_interval(1.0, cpu_ticks_by_key, total_ticks)
        self._shares[device_id] = _Shares(fractions, system, SYSTEM)

    def on_reading(self, reading: DeviceReading) -> dict[K | SpecialKey, float]:
        """Joules per key (``IDLE``/``SYSTEM`` included) used by the device since its previous reading.

        The first reading of a device only sets the baseline and returns ``{}``; so does a reading whose energy
        is not finite (ignored, the baseline stays). ``energy_j`` is monotonic; a lower value (which it should
        never be) is taken as a new baseline with nothing used, so no key is ever given negative joules.
        """
        energy_j = reading.energy_j
        if not math.isfinite(energy_j):
            return {}
        last = self._last_energy_j.get(reading.device_id)
        self._last_energy_j[reading.device_id] = energy_j
        if last is None:
            return {}
        delta_j = max(0.0, energy_j - last)
        shares = self._shares.get(reading.device_id)
        if shares is None:
            return {IDLE: delta_j}
        out: dict[K | SpecialKey, float] = {key: delta_j * fraction for key, fraction in shares.fractions.items()}
        out[shares.rest_key] = delta_j * shares.rest_fraction
        return out


class _Series:
    """One exported (key, device) series: its cumulative joules and the increments inside the power window."""

    __slots__ = ("recent", "total_j")

    def __init__(self) -> None:
        self.total_j = 0.0
        # (since_s, now_s, joules), oldest first: joules used over (since_s, now_s]; since_s == now_s for a point
        self.recent: deque[tuple[float, float, float]] = deque()

    def prune(self, cutoff_s: float) -> None:
        recent = self.recent
        while recent and recent[0][1] <= cutoff_s:
            recent.popleft()

    def joules_after(self, cutoff_s: float) -> float:
        """The joules of the increments after ``cutoff_s``; one that straddles it counts for its part after it
        (spread evenly over its interval)."""
        total = 0.0
        for since_s, now_s, joules in self.recent:
            if since_s >= cutoff_s or now_s <= since_s:
                total += joules
            elif now_s > cutoff_s:
                total += joules * (now_s - cutoff_s) / (now_s - since_s)
        return total


class WorkloadEnergy(Generic[K]):
    """Cumulative joules per (key, device id), for export as counters that never go backwards.

    ``power_window_s`` (seconds): a series' power is the joules added to it in the window of ``power_window_s``
    that ends at its device's latest increment (``end - window < t <= end``), divided by ``power_window_s``: energy
    is known up to the device's latest reading, not up to the snapshot. A device with no increment for a whole
    window has its window end at the snapshot's ``now_s`` (its power falls to 0). A series younger than the window
    reads low until it is a window old. An increment added with ``since_s`` covers ``(since_s, now_s]`` and counts
    for the part of it inside the window (the joules spread evenly over it).

    ``retain_s`` (seconds): a workload key not seen (``add``) for longer than that is dropped at the next
    ``snapshot``: its series disappear and, should it come back, start again from 0 as new series.
    ``IDLE``, ``SYSTEM`` and ``OTHER`` never expire.

    ``max_series``: when the (key, device) series, all keys counted, exceed it, the workload keys with the
    smallest totals over all devices (the least recently seen first among equals) are folded into ``OTHER``:
    their joules move into ``OTHER``'s series for the same devices, so ``OTHER`` never decreases. A folded key is
    remembered: while it keeps being seen its joules keep going into ``OTHER``, and it is forgotten only when not
    seen for ``retain_s``, like any other key. Folding stops when no workload key is left to fold, so the special
    keys may exceed a very small ``max_series``.
    """

    def __init__(self, max_series: int, retain_s: float, power_window_s: float) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, got {max_series}")
        if not retain_s >= 0:
            raise ValueError(f"retain_s must be 0 or more, got {retain_s}")
        if not power_window_s > 0:
            raise ValueError(f"power_window_s must be positive, got {power_window_s}")
        self.max_series = max_series
        self.retain_s = retain_s
        self.power_window_s = power_window_s
        self._series: dict[K | SpecialKey, dict[str, _Series]] = {}
        self._last_seen_s: dict[K | SpecialKey, float] = {}
        self._folded: dict[K | SpecialKey, float] = {}  # folded key -> last seen (seconds)
        self._count = 0  # number of (key, device) series
        self._device_now_s: dict[str, float] = {}  # device id -> the end of its latest increment

    @property
    def series_count(self) -> int:
        """The number of (key, device) series exported now."""
        return self._count

    def touch(self, key: K | SpecialKey, now_s: float) -> None:
        """Mark ``key`` as seen without adding energy: a live workload that used nothing since does not expire."""
        if key in self._last_seen_s:
            self._last_seen_s[key] = now_s
        elif key in self._folded:
            self._folded[key] = now_s

    def keys(self) -> set[K | SpecialKey]:
        """The keys that have series now."""
        return set(self._series)

    def last_seen_s(self, key: K | SpecialKey) -> float | None:
        """When ``key`` was last added (seconds, the ``now_s`` clock), folded keys included; None if unknown."""
        seen = self._last_seen_s.get(key)
        return seen if seen is not None else self._folded.get(key)

    def is_folded(self, key: K | SpecialKey) -> bool:
        """Whether ``key``'s joules go into ``OTHER``."""
        return key in self._folded

    def add(
        self, key: K | SpecialKey, device_id: str, joules: float, now_s: float, since_s: float | None = None
    ) -> None:
        """Add ``joules`` used by ``key`` on ``device_id`` over ``(since_s, now_s]`` (at ``now_s`` when
        ``since_s`` is None); ``now_s`` (seconds) also marks ``key`` as seen.

        Raises ValueError when ``joules`` is negative or not finite: a counter must never go backwards.
        """
        _check_energy(joules)
        if now_s > self._device_now_s.get(device_id, -math.inf):
            self._device_now_s[device_id] = now_s
        if key in self._folded:
            self._folded[key] = now_s
            key = OTHER
        self._last_seen_s[key] = now_s
        by_device = self._series.get(key)
        if by_device is None:
            by_device = self._series[key] = {}
        series = by_device.get(device_id)
        new = series is None
        if series is None:
            series = by_device[device_id] = _Series()
            self._count += 1
        series.total_j += joules
        if joules > 0:
            series.recent.append((now_s if since_s is None else min(since_s, now_s), now_s, joules))
        series.prune(now_s - self.power_window_s)
        if new and self._count > self.max_series:
            self._fold()

    def add_many(
        self,
        device_id: str,
        joules_by_key: Mapping[K | SpecialKey, float],
        now_s: float,
        since_s: float | None = None,
    ) -> None:
        """``add`` of each (key, joules) on ``device_id`` over ``(since_s, now_s]``, in order: one split of the
        device's energy (``DeviceSplitter.on_reading``). The same result as one ``add`` per key, for less work.

        Raises ValueError, before adding anything, when any ``joules`` is negative or not finite.
        """
        for joules in joules_by_key.values():
            if not 0.0 <= joules < math.inf:  # NaN fails too
                _check_energy(joules)
        cutoff_s = now_s - self.power_window_s
        start_s = now_s if since_s is None else min(since_s, now_s)
        if joules_by_key and now_s > self._device_now_s.get(device_id, -math.inf):
            self._device_now_s[device_id] = now_s
        folded = self._folded
        last_seen = self._last_seen_s
        all_series = self._series
        for key, joules in joules_by_key.items():
            if folded and key in folded:
                self.add(key, device_id, joules, now_s, since_s)
                continue
            by_device = all_series.get(key)
            series = by_device.get(device_id) if by_device is not None else None
            if series is None:  # a new series, which may fold others
                self.add(key, device_id, joules, now_s, since_s)
                continue
            last_seen[key] = now_s
            if joules > 0:
                series.total_j += joules
                recent = series.recent
                recent.append((start_s, now_s, joules))
                while recent[0][1] <= cutoff_s:  # never the increment just added: the window is positive
                    recent.popleft()

    def snapshot(self, now_s: float) -> list[tuple[K | SpecialKey, str, float, float]]:
        """Drop keys not seen for ``retain_s``, then (key, device id, cumulative joules, power watts) per series."""
        self._expire(now_s)
        window_s = self.power_window_s
        cutoffs: dict[str, float] = {}
        for device_id, end_s in self._device_now_s.items():
            cutoffs[device_id] = (end_s if now_s - end_s < window_s else now_s) - window_s
        rows: list[tuple[K | SpecialKey, str, float, float]] = []
        for key, by_device in self._series.items():
            for device_id, series in by_device.items():
                cutoff_s = cutoffs.get(device_id, now_s - window_s)
                series.prune(cutoff_s)
                power_w = series.joules_after(cutoff_s) / self.power_window_s
                rows.append((key, device_id, series.total_j, power_w))
        return rows

    def _expire(self, now_s: float) -> None:
        cutoff_s = now_s - self.retain_s
        stale = [key for key, seen in self._last_seen_s.items() if seen < cutoff_s and not isinstance(key, SpecialKey)]
        for key in stale:
            del self._last_seen_s[key]
            self._count -= len(self._series.pop(key, {}))
        for folded in [folded for folded, seen in self._folded.items() if seen < cutoff_s]:
            del self._folded[folded]

    def _fold(self) -> None:
        """Fold the smallest workload keys into ``OTHER`` until the series fit ``max_series`` or none is left."""
        candidates = sorted(
            (key for key in self._series if not isinstance(key, SpecialKey)),
            key=lambda k: (sum(s.total_j for s in self._series[k].values()), self._last_seen_s.get(k, 0.0)),
        )
        for key in candidates:
            if self._count <= self.max_series:
                return
            self._fold_key(key)

    def _fold_key(self, key: K | SpecialKey) -> None:
        by_device = self._series.pop(key)
        self._folded[key] = self._last_seen_s.pop(key)
        self._count -= len(by_device)
        other = self._series.setdefault(OTHER, {})
        for device_id, series in by_device.items():
            target = other.get(device_id)
            if target is None:
                other[device_id] = series  # its total and recent increments carry over as they are
                self._count += 1
                continue
            target.total_j += series.total_j
            target.recent = deque(sorted([*target.recent, *series.recent], key=lambda item: item[1]))
        other_seen = self._last_seen_s.get(OTHER)
        folded_seen = self._folded[key]
        self._last_seen_s[OTHER] = folded_seen if other_seen is None else max(other_seen, folded_seen)
