"""Energy-per-request attribution kernel: spans per second at 1,000 concurrent requests, and the naive loop it replaces.

``python -m bench.request_kernel`` prints the figures. The large case is 1,000,000 spans (one stretch each, its own
request) of 0-20 s, starting uniformly over 10,000 s so that ~1,000 run at once, on one workload whose energy is
sampled at 10 Hz over the whole span of time (~100,000 samples); timed with and without 10 Hz power samples.
Target (issue 5): >= 1,000,000 spans/s. The naive loop (for every elementary interval, a Python loop over the active
requests) runs on a small case, 10,000 spans at the same arrival rate (a mean of ~830 running: the ramp up and down
weighs more), against the kernel on the same case; their results are checked to agree before the times count.
Times are medians of repeated runs, on whatever else the machine is doing: quote them with its load.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bench.common import Context, Result
from collector.aggregator.request_energy import RequestEnergy, attribute_requests

NS = 1_000_000_000
LARGE_SPANS = 1_000_000
SMALL_SPANS = 10_000  # the naive loop does ~concurrency Python steps per boundary: seconds here
CONCURRENCY = 1_000
MAX_SPAN_S = 20.0  # uniform 0-20 s: 10 s on average
RATE_HZ = 10
REPEATS = 5
TARGET_SPANS_PER_S = 1_000_000.0
EPOCH_NS = 1_750_000_000 * NS


@dataclass(frozen=True)
class Workload:
    sample_ns: npt.NDArray[np.int64]
    energy_j: npt.NDArray[np.float64]
    power_w: npt.NDArray[np.float64]
    start_ns: npt.NDArray[np.int64]
    end_ns: npt.NDArray[np.int64]


def workload(spans: int, concurrency: int, seed: int = 0) -> Workload:
    """``spans`` spans in random order (as they arrive), ``concurrency`` running at once on average."""
    rng = np.random.default_rng(seed)
    horizon_s = spans * (MAX_SPAN_S / 2) / concurrency
    start = EPOCH_NS + (rng.uniform(0, horizon_s, spans) * NS).astype(np.int64)
    end = start + (rng.uniform(0, MAX_SPAN_S, spans) * NS).astype(np.int64)
    sample_ns = EPOCH_NS + np.arange(int((horizon_s + MAX_SPAN_S) * RATE_HZ) + 1, dtype=np.int64) * (NS // RATE_HZ)
    power_w = 300.0 + 400.0 * rng.random(sample_ns.size)
    energy_j = 1e6 + np.concatenate([[0.0], np.cumsum(power_w[1:] / RATE_HZ)])
    return Workload(sample_ns, energy_j, power_w, start, end)


def kernel(load: Workload, with_power: bool = False) -> RequestEnergy:
    return attribute_requests(
        load.sample_ns,
        load.energy_j,
        request=np.arange(load.start_ns.size),
        start_ns=load.start_ns,
        end_ns=load.end_ns,
        power_ns=load.sample_ns if with_power else None,
        power_w=load.power_w if with_power else None,
    )


def naive(load: Workload) -> list[float]:
    """The loop the kernel replaces: for every elementary interval, split its energy over the active requests."""
    samples: list[int] = load.sample_ns.tolist()
    energy: list[float] = load.energy_j.tolist()
    starts: list[int] = load.start_ns.tolist()
    ends: list[int] = load.end_ns.tolist()
    t0, t_last = samples[0], samples[-1]
    events: dict[int, list[tuple[int, int]]] = {}
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        events.setdefault(min(max(a, t0), t_last), []).append((i, 1))
        events.setdefault(min(max(b, t0), t_last), []).append((i, -1))
    points = sorted(set(samples) | set(events))

    def energy_at(t: int) -> float:
        j = min(bisect.bisect_right(samples, t) - 1, len(samples) - 2)
        return energy[j] + (energy[j + 1] - energy[j]) * (t - samples[j]) / (samples[j + 1] - samples[j])

    out = [0.0] * len(starts)
    active: set[int] = set()
    for a, b in itertools.pairwise(points):
        for i, change in events.get(a, ()):
            if change > 0:
                active.add(i)
        for i, change in events.get(a, ()):
            if change < 0:
                active.discard(i)
        if active:
            share = (energy_at(b) - energy_at(a)) / len(active)
            for i in active:
                out[i] += share
    return out


def _median_s(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _concurrency(load: Workload) -> float:
    """Mean number of spans running, from the first start to the last end."""
    busy = float(np.sum(load.end_ns - load.start_ns))
    return busy / float(load.end_ns.max() - load.start_ns.min())


def run() -> dict[str, float]:
    large = workload(LARGE_SPANS, CONCURRENCY)
    linear_s = _median_s(lambda: kernel(large), REPEATS)
    shaped_s = _median_s(lambda: kernel(large, with_power=True), REPEATS)
    result = kernel(large)
    conservation = abs(float(result.energy_j.sum()) + result.unattributed_j - result.window_j) / result.window_j

    small = workload(SMALL_SPANS, CONCURRENCY, seed=1)
    small_kernel_s = _median_s(lambda: kernel(small), REPEATS)
    started = time.perf_counter()
    reference = np.array(naive(small))
    naive_s = time.perf_counter() - started
    got = kernel(small).energy_j
    disagreement = float(np.max(np.abs(got - reference)) / np.max(reference))
    if disagreement > 1e-9:
        raise RuntimeError(f"kernel and naive loop disagree by {disagreement:.3g} of the largest request")
    return {
        "large_spans": float(LARGE_SPANS),
        "large_samples": float(large.sample_ns.size),
        "large_mean_concurrency": round(_concurrency(large), 1),
        "kernel_s": round(linear_s, 4),
        "kernel_spans_per_s": round(LARGE_SPANS / linear_s),
        "kernel_with_power_s": round(shaped_s, 4),
        "kernel_with_power_spans_per_s": round(LARGE_SPANS / shaped_s),
        "conservation_relative_error": conservation,
        "small_spans": float(SMALL_SPANS),
        "small_mean_concurrency": round(_concurrency(small), 1),
        "small_kernel_s": round(small_kernel_s, 5),
        "small_naive_s": round(naive_s, 3),
        "small_naive_spans_per_s": round(SMALL_SPANS / naive_s),
        "speedup_on_small_case": round(naive_s / small_kernel_s, 1),
        "naive_kernel_disagreement": disagreement,
    }


def bench_run(ctx: Context) -> list[Result]:
    """``bench.run``'s rows (the same case whatever ``--quick``: it is the case the target is set on)."""
    figures = run()
    value = figures["kernel_spans_per_s"]
    return [
        Result(
            "request_kernel",
            f"attribution kernel spans/s, {LARGE_SPANS:,} spans at ~{CONCURRENCY:,} concurrent, {RATE_HZ} Hz samples",
            value,
            "spans/s",
            f">= {TARGET_SPANS_PER_S:,.0f}",
            value >= TARGET_SPANS_PER_S,
            details=figures,
        ),
        Result(
            "request_kernel",
            "same, energy shaped by 10 Hz power samples",
            figures["kernel_with_power_spans_per_s"],
            "spans/s",
        ),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.request_kernel", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    figures = run()
    verdict = "pass" if figures["kernel_spans_per_s"] >= TARGET_SPANS_PER_S else "FAIL"
    print(f"request attribution kernel, {CONCURRENCY} concurrent, {RATE_HZ} Hz samples")
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value:g}")
    print(f"  target kernel_spans_per_s >= {TARGET_SPANS_PER_S:g}: {verdict}")


if __name__ == "__main__":
    main()
