"""3. Agent peak RSS (VmHWM) with 8 simulated GPUs + fake RAPL, after the idle run and after scraping."""

from __future__ import annotations

import time

from bench.common import Context, Result, Scraper, check, read_status_kib

NAME = "rss"
TARGET_MIB = 64.0


def run(ctx: Context) -> list[Result]:
    d = ctx.durations
    agent = ctx.shared_agent()
    after_idle = ctx.notes.get("vm_after_idle_kib")
    idle_source = "after the overhead benchmark's idle window"
    if after_idle is None:  # run on its own (--only rss): a short idle period stands in for the overhead run
        time.sleep(d.warmup_s + d.overhead_window_s / 2)
        after_idle = read_status_kib(agent.pid)
        idle_source = f"after {d.warmup_s + d.overhead_window_s / 2:g} s idle"
    for gzip_ok in (False, True):
        with Scraper(agent.port, gzip_ok=gzip_ok) as scraper:
            for _ in range(d.rss_scrapes):
                scraper.get()
    with Scraper(agent.port, gzip_ok=False, keep_alive=False) as scraper:
        for _ in range(d.rss_scrapes // 5):
            scraper.get()
    agent.check_alive()
    after_scrapes = read_status_kib(agent.pid)

    idle_hwm = after_idle["VmHWM"] / 1024
    scraped_hwm = after_scrapes["VmHWM"] / 1024
    target = f"< {TARGET_MIB:g} MiB"
    scrapes = 2 * d.rss_scrapes + d.rss_scrapes // 5
    return [
        Result(
            NAME,
            f"agent VmHWM {idle_source}",
            round(idle_hwm, 1),
            "MiB",
            target,
            check(idle_hwm, "<", TARGET_MIB),
            {"status_kib": after_idle},
        ),
        Result(
            NAME,
            f"agent VmHWM after {scrapes} more scrapes (plain, gzip, fresh connections)",
            round(scraped_hwm, 1),
            "MiB",
            target,
            check(scraped_hwm, "<", TARGET_MIB),
            {"status_kib": after_scrapes, "note": "includes the latency benchmark's scrapes when it ran first"},
        ),
        Result(NAME, "agent VmRSS now", round(after_scrapes["VmRSS"] / 1024, 1), "MiB"),
    ]
