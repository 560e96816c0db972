"""2. /metrics scrape latency with 8 simulated GPUs + fake RAPL: keep-alive, fresh connections, gzip, paced."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.common import Context, Result, Scraper, check, percentile, series, sleep_until, start_node_exporter

NAME = "latency"
TARGET_P99_MS = 5.0


@dataclass
class Run:
    label: str
    keep_alive: bool
    gzip_ok: bool
    requests: int
    interval_s: float = 0.0  # 0: back to back


def measure(port: int, run: Run, max_s: float) -> tuple[list[float], int]:
    """Wall time of each GET (request sent to body read, connect included for fresh connections), in ms.

    Stops early after ``max_s`` seconds, so a pathologically slow server cannot stall the run."""
    times: list[float] = []
    size = 0
    with Scraper(port, gzip_ok=run.gzip_ok, keep_alive=run.keep_alive) as scraper:
        if run.keep_alive:
            scraper.get()  # connect outside the timed loop
        start = time.monotonic()
        for i in range(run.requests):
            if time.monotonic() - start > max_s:
                break
            if run.interval_s:
                sleep_until(start + i * run.interval_s)
            t0 = time.perf_counter_ns()
            body, _ = scraper.get()
            times.append((time.perf_counter_ns() - t0) / 1e6)
            size = len(body)
    return times, size


def run(ctx: Context) -> list[Result]:
    d = ctx.durations
    agent = ctx.shared_agent()
    with Scraper(agent.port) as probe:
        text = probe.text()
    runs = [
        Run("keep-alive", True, False, d.latency_requests),
        Run("fresh connection", False, False, d.latency_requests),
        Run("keep-alive + gzip", True, True, d.latency_requests),
        # Spaced past the sampler's 10 Hz updates, so every scrape re-renders, as each Prometheus scrape does.
        Run(
            f"keep-alive + gzip, 1 per {d.latency_paced_interval_s:g} s (each renders)",
            True, True, d.latency_paced_requests, d.latency_paced_interval_s,
        ),
    ]  # fmt: skip
    results = []
    for spec in runs:
        times, size = measure(agent.port, spec, d.latency_max_s)
        p50, p99 = percentile(times, 50), percentile(times, 99)
        details = {
            "requests": len(times),
            "requests_planned": spec.requests,
            "p50_ms": p50,
            "p90_ms": percentile(times, 90),
            "p99_ms": p99,
            "max_ms": max(times),
            "mean_ms": sum(times) / len(times),
            "body_bytes": size,
            "interval_s": spec.interval_s,
        }
        results.append(Result(NAME, f"scrape p50, {spec.label} (n={len(times)})", round(p50, 3), "ms", details=details))
        results.append(
            Result(
                NAME,
                f"scrape p99, {spec.label} (n={len(times)})",
                round(p99, 3),
                "ms",
                f"< {TARGET_P99_MS:g} ms",
                check(p99, "<", TARGET_P99_MS),
                details,
            )
        )
    agent.check_alive()
    results.append(Result(NAME, "series in the agent's /metrics", series(text), "series"))
    # The same paced run against node_exporter (rapl only, same fake tree): a reference for what a scrape after
    # 100 ms of idle costs on this machine, where waking an idle process is itself a large part of the latency.
    paced = runs[-1]
    node_exporter = start_node_exporter(ctx.workdir, ctx.rapl)
    try:
        times, _ = measure(node_exporter.port, paced, d.latency_max_s)
    finally:
        node_exporter.stop()
    results.append(
        Result(
            NAME,
            f"reference: node_exporter p99, {paced.label.replace(' (each renders)', '')} (n={len(times)})",
            round(percentile(times, 99), 3),
            "ms",
            details={"p50_ms": percentile(times, 50), "p90_ms": percentile(times, 90), "max_ms": max(times)},
        )
    )
    return results
