"""5. (informational) In-process cost of one /metrics render, and a cProfile of it.

Builds the agent's sampler (8 simulated GPUs + RAPL on the fake tree) and exporter cache in this process and
forces a re-render on every ``ExpositionCache.body`` call, as every Prometheus scrape does (the sampler changes
about 20 times a second, scrapes come every 15 s). The profile lands in ``bench/results/render_profile.txt``.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from pathlib import Path

from bench.common import SAMPLE_INTERVAL_S, SIMULATED_GPUS, Context, Result

NAME = "render"
PROFILE_PATH = Path(__file__).resolve().parent / "results" / "render_profile.txt"


def run(ctx: Context) -> list[Result]:
    from collector.exporters.prometheus import ExpositionCache
    from collector.sampler import Sampler
    from collector.sources.rapl import RaplSource
    from collector.sources.simulated import SimulatedSource

    sources = [RaplSource(ctx.rapl.class_dir, SAMPLE_INTERVAL_S), SimulatedSource(SIMULATED_GPUS, SAMPLE_INTERVAL_S)]
    for source in sources:
        source.open()
    sampler = Sampler(sources)
    for state in sampler.states:
        sampler.mark_opened(state)
    cache = ExpositionCache(sampler)
    iterations = ctx.durations.render_iterations
    sampler.start()
    try:
        time.sleep(0.5)  # a few reads and one status read, so every family has samples

        def timed(want_gzip: bool) -> float:
            start = time.perf_counter_ns()
            for _ in range(iterations):
                sampler.version += 1  # force a render
                cache.body(want_gzip)
            return (time.perf_counter_ns() - start) / iterations / 1e3

        timed(False)  # warm
        plain_us = timed(False)
        gzip_us = timed(True)
        cache_hit_start = time.perf_counter_ns()
        for _ in range(iterations):
            cache.body(True)
        hit_us = (time.perf_counter_ns() - cache_hit_start) / iterations / 1e3

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(iterations):
            sampler.version += 1
            cache.body(True)
        profiler.disable()
    finally:
        sampler.stop()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(20)
    stats.sort_stats("cumulative").print_stats(25)
    PROFILE_PATH.parent.mkdir(parents=True, exist_ok=True)
    PROFILE_PATH.write_text(out.getvalue())
    return [
        Result(NAME, f"in-process render, forced, n={iterations}", round(plain_us, 1), "us"),
        Result(NAME, "in-process render + gzip, forced", round(gzip_us, 1), "us"),
        Result(
            NAME, "in-process cached body (no render)", round(hit_us, 2), "us", details={"profile": str(PROFILE_PATH)}
        ),
    ]
