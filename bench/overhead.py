"""1. Agent CPU overhead: 8 simulated GPUs + fake RAPL at 10 Hz, idle and with one scrape every 15 s."""

from __future__ import annotations

import time

from bench.common import (
    Context,
    Result,
    Scraper,
    check,
    cpu_delta,
    cpu_sample,
    read_status_kib,
    sleep_until,
    thread_count,
)

NAME = "overhead"
TARGET_CPU_S_PER_S = 0.01  # 1% of one core


def run(ctx: Context) -> list[Result]:
    d = ctx.durations
    agent = ctx.shared_agent()
    time.sleep(d.warmup_s)
    agent.check_alive()
    pid = agent.pid
    threads_idle = thread_count(pid)

    # Window 1: no scrapes at all.
    before = cpu_sample(pid)
    time.sleep(d.overhead_window_s)
    idle = cpu_delta(before, cpu_sample(pid))
    agent.check_alive()
    ctx.notes["vm_after_idle_kib"] = read_status_kib(pid)

    # Window 2: one scrape every 15 s over a keep-alive connection, as Prometheus does. The connection (and the
    # server's thread for it) is opened before the window, so no thread exits inside it and schedstat is exact.
    with Scraper(agent.port, gzip_ok=True) as scraper:
        scraper.get()
        time.sleep(1.0)
        before = cpu_sample(pid)
        scrapes = max(1, round(d.prometheus_window_s / d.prometheus_interval_s))
        step = d.prometheus_window_s / scrapes
        for k in range(scrapes):  # mid-slot scrapes, so each one's cost lands well inside the window
            sleep_until(before.mono_s + (k + 0.5) * step)
            scraper.get()
        sleep_until(before.mono_s + d.prometheus_window_s)
        scraped = cpu_delta(before, cpu_sample(pid))
        threads_scraped = thread_count(pid)
    agent.check_alive()

    target = f"< {TARGET_CPU_S_PER_S:g} CPU-s/s"
    return [
        Result(
            NAME,
            "agent CPU, idle (no scrapes), CPU-s per wall-s",
            round(idle.per_wall_s, 5),
            "CPU-s/s",
            target,
            check(idle.per_wall_s, "<", TARGET_CPU_S_PER_S),
            idle.to_json() | {"percent_of_one_core": 100 * idle.per_wall_s},
        ),
        Result(
            NAME,
            f"agent CPU, 1 scrape / {d.prometheus_interval_s:g} s, CPU-s per wall-s",
            round(scraped.per_wall_s, 5),
            "CPU-s/s",
            target,
            check(scraped.per_wall_s, "<", TARGET_CPU_S_PER_S),
            scraped.to_json() | {"scrapes": scrapes, "percent_of_one_core": 100 * scraped.per_wall_s},
        ),
        Result(NAME, "agent threads (idle)", threads_idle, "threads"),
        Result(NAME, "agent threads (keep-alive scrape connection open)", threads_scraped, "threads"),
    ]
