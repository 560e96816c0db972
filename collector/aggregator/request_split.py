"""One host's spans over one window of time, split with ``attribute_requests``: per span, its energy by device
kind, its share of idle energy, whether samples covered it and whether it is ready to be final. Pure (numpy only):
the engine (``request_engine``) loads what it needs from the store.

Per workload and device that adds into host totals, the workload's cumulative energy on that device (its
identities summed) is split among ALL the spans active on that workload in the window, by the stretches and
weights of ``request_weights``; the device's measured power, when it sent any, shapes the energy between counter
samples. Per device, its ``idle`` series is split among all spans of every workload that used the device.

Agents send a workload's series only while it changes, plus the first and last sample of each flat stretch. So
before its first sample in the window and after its last one the series is flat, as far as the device's own
samples (sent every reading) show: up to the device's latest sample less ``SETTLE_NS`` (a workload's sample can
come in the batch after its device reading's).

A span is ready (its energy will not change as more samples arrive) when, on every device of its workload, the
samples cover it, the device has samples at or past its end, and its device samples have no gap longer than
``MAX_GAP_NS`` during it, nor a stretch they join unmeasured (an agent restart, a batch not stored yet:
``Device.unmeasured``), however short: such a span is approximate once its grace is over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from collector.aggregator.request_energy import attribute_requests
from collector.aggregator.request_weights import Stretches
from collector.store.base import Float64Array, Int64Array

BoolArray = np.ndarray
SETTLE_NS = 2_000_000_000  # two of an agent's default 1 s batches
MAX_GAP_NS = 2_000_000_000  # device samples come at 10 Hz (1 Hz for the CPU estimate): a longer silence is a gap
KINDS = ("gpu", "cpu", "dram")


@dataclass(frozen=True)
class Series:
    """A cumulative energy counter: time_ns (Unix ns, strictly increasing) and energy_j (J)."""

    time_ns: Int64Array
    energy_j: Float64Array

    @classmethod
    def empty(cls) -> Series:
        return cls(np.empty(0, np.int64), np.empty(0, np.float64))

    @classmethod
    def of(cls, samples: Sequence[tuple[int, float]]) -> Series:
        if not samples:
            return cls.empty()
        return cls(np.array([s[0] for s in samples], np.int64), np.array([s[1] for s in samples], np.float64))


@dataclass(frozen=True)
class Device:
    """One device of the host in the window: its kind, its own sample times, its measured power and idle series."""

    kind: str  # gpu | cpu | dram
    time_ns: Int64Array
    power_ns: Int64Array
    power_w: Float64Array
    idle: Series
    # (after, before) ns: stretches its samples join without having measured them (``Store.unmeasured_times``)
    unmeasured: tuple[tuple[int, int], ...] = ()


@dataclass
class SpanEnergy:
    """Per span (parallel to the spans given to ``split``): joules by kind, idle share, and the two flags."""

    by_kind: dict[str, Float64Array]  # KINDS -> J
    idle_j: Float64Array
    measured: BoolArray  # some device of its workload had samples during it
    ready: BoolArray


def summed(series: Sequence[Series]) -> Series:
    """Several counters of one workload on one device (its identities) as one: each linearly interpolated onto the
    union of their sample times (held at its end values beyond its samples), which is exactly the sum of the
    piecewise-linear counters."""
    present = [s for s in series if s.time_ns.size]
    if len(present) <= 1:
        return present[0] if present else Series.empty()
    grid = np.unique(np.concatenate([s.time_ns for s in present]))
    t0 = grid[0]
    # interpolated on times relative to the first (exact in float64): Unix ns are 256 ns apart in float64
    at = (grid - t0).astype(np.float64)
    total = np.zeros(grid.size)
    for s in present:
        total += np.interp(at, (s.time_ns - t0).astype(np.float64), s.energy_j)
    return Series(grid, total)


def with_flat_ends(series: Series, device_ns: Int64Array) -> Series:
    """``series`` held flat before its first sample back to the device's first sample, and after its last up to
    the device's latest less ``SETTLE_NS`` (see the module docstring); an empty series is flat at 0."""
    if device_ns.size == 0:
        return series
    t, e = series.time_ns, series.energy_j
    if t.size == 0:
        t, e = device_ns[:1], np.zeros(1)
    known_until = int(device_ns[-1]) - SETTLE_NS
    head_t = device_ns[:1] if device_ns[0] < t[0] else np.empty(0, np.int64)
    tail_t = np.array([known_until], np.int64) if known_until > t[-1] else np.empty(0, np.int64)
    if head_t.size or tail_t.size:
        t = np.concatenate([head_t, t, tail_t])
        e = np.concatenate([e[:1] if head_t.size else e[:0], e, e[-1:] if tail_t.size else e[:0]])
    return Series(t, e)


def _clean(series: Series) -> Series:
    """Strictly increasing times and a non-decreasing counter, as the kernel requires: the store joins an agent's
    instances into one continuous counter, so a repeat or a dip is a sample stored twice or a rounding, not energy."""
    t, e = series.time_ns, series.energy_j
    if t.size > 1 and (np.any(np.diff(t) <= 0) or np.any(np.diff(e) < 0)):
        t, first = np.unique(t, return_index=True)
        e = np.maximum.accumulate(e[first])
    return Series(t, e)


def _clean_power(device: Device) -> tuple[Int64Array, Float64Array] | tuple[None, None]:
    """The device's power samples as the kernel requires them (strictly increasing times), or None without any: a
    sample stored twice, or two instances' samples interleaved, keep the first at each time."""
    t, w = device.power_ns, device.power_w
    if t.size == 0:
        return None, None
    if t.size > 1 and np.any(np.diff(t) <= 0):
        t, first = np.unique(t, return_index=True)
        w = w[first]
    return t, w


def _unmeasured_overlap(stretches: Sequence[tuple[int, int]], start: Int64Array, end: Int64Array) -> BoolArray:
    """Per span: one of ``stretches`` (after, before) is inside it in part (few: restarts and missing batches)."""
    hit: BoolArray = np.zeros(start.size, bool)
    for after, before in stretches:
        hit |= (start < before) & (end > after)
    return hit


def _gap_overlap(device_ns: Int64Array, start: Int64Array, end: Int64Array) -> BoolArray:
    """Per span: a gap of more than MAX_GAP_NS between two device samples overlaps it."""
    if device_ns.size < 2:
        return np.zeros(start.size, bool)
    dt = np.diff(device_ns)
    gaps = np.flatnonzero(dt > MAX_GAP_NS)
    if gaps.size == 0:
        return np.zeros(start.size, bool)
    gap_start, gap_end = device_ns[gaps], device_ns[gaps + 1]
    # gaps are disjoint and sorted: those opening before the span's end less those closing at or before its start
    overlapping = np.searchsorted(gap_start, end, side="left") - np.searchsorted(gap_end, start, side="right")
    result: BoolArray = overlapping > 0
    return result


def split(
    start_ns: Int64Array,
    end_ns: Int64Array,
    workload: Sequence[str | None],
    stretches: Stretches,
    workload_series: Mapping[tuple[str, str], Series],
    devices: Mapping[str, Device],
) -> SpanEnergy:
    """Split one host's energy among its spans. ``workload[i]`` is span i's resolved workload (None: unresolved:
    it gets nothing and weighs nothing); ``stretches`` index the spans; ``workload_series[(workload, device)]`` is
    a workload's counter on a device, for every device it used (devices that add into host totals only)."""
    n = start_ns.size
    by_kind = {kind: np.zeros(n) for kind in KINDS}
    idle_j = np.zeros(n)
    measured = np.zeros(n, bool)
    ready = np.zeros(n, bool)
    names = sorted({name for name in workload if name is not None})
    code: dict[str | None, int] = {name: i for i, name in enumerate(names)}
    span_workload = np.fromiter(map(code.get, workload, repeat(-1)), np.int64, n)  # None is not a name: -1
    stretch_workload = span_workload[stretches.span] if n else np.empty(0, np.int64)
    devices_of: dict[str, list[str]] = {}
    for name, device_id in workload_series:
        if name in code and device_id in devices:
            devices_of.setdefault(name, []).append(device_id)
    ready[span_workload >= 0] = True
    power: dict[str, tuple[Int64Array, Float64Array] | tuple[None, None]] = {}  # device -> its power, cleaned
    users: dict[str, list[int]] = {}  # device -> workload codes on it
    for name in names:
        w = code[name]
        mine = span_workload == w
        used = devices_of.get(name, [])
        if not used:
            ready[mine] = False  # no energy known for it on this host (yet)
            continue
        chosen = stretch_workload == w
        for device_id in used:
            device = devices[device_id]
            users.setdefault(device_id, []).append(w)
            series = _clean(with_flat_ends(workload_series[(name, device_id)], device.time_ns))
            if device_id not in power:
                power[device_id] = _clean_power(device)
            if series.time_ns.size == 0:
                ready[mine] = False
                continue
            result = attribute_requests(
                series.time_ns,
                series.energy_j,
                request=stretches.span[chosen],
                start_ns=stretches.start_ns[chosen],
                end_ns=stretches.end_ns[chosen],
                weight=stretches.weight[chosen],
                n_requests=n,
                power_ns=power[device_id][0],
                power_w=power[device_id][1],
            )
            by_kind[device.kind if device.kind in by_kind else "gpu"] += result.energy_j
            inside = (start_ns <= result.window_end_ns) & (end_ns >= result.window_start_ns)
            measured |= mine & inside & (series.time_ns.size > 1)
            device_last = int(device.time_ns[-1]) if device.time_ns.size else -1
            ok = result.covered & (end_ns <= device_last) & ~_gap_overlap(device.time_ns, start_ns, end_ns)
            if device.unmeasured:
                ok &= ~_unmeasured_overlap(device.unmeasured, start_ns, end_ns)
            ready &= ~mine | ok
    for device_id, codes in users.items():
        idle = _clean(with_flat_ends(devices[device_id].idle, devices[device_id].time_ns))
        if idle.time_ns.size < 2:
            continue
        chosen = np.isin(stretch_workload, codes)
        result = attribute_requests(
            idle.time_ns,
            idle.energy_j,
            request=stretches.span[chosen],
            start_ns=stretches.start_ns[chosen],
            end_ns=stretches.end_ns[chosen],
            weight=stretches.weight[chosen],
            n_requests=n,
        )
        idle_j += result.energy_j
    return SpanEnergy(by_kind, idle_j, measured, ready)
