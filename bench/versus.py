"""4. Side by side with node_exporter's rapl collector: CPU per scrape, over the same fake RAPL tree.

Each exporter runs alone (the other is stopped), is scraped N times at about 20/s over one keep-alive connection
with ``Accept-Encoding: gzip`` (as Prometheus does), and its CPU during that window, less its idle CPU over a
window of the same length without scrapes, divided by N is its CPU per scrape.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

from bench.common import (
    BenchError,
    Context,
    ManagedProcess,
    Result,
    Scraper,
    check,
    cpu_delta,
    cpu_sample,
    series,
    sleep_until,
    stopping,
)

NAME = "versus"
TARGET_RATIO = 1.0

# What procfs (sysfs.GetRaplZones, used by node_exporter's rapl collector) reads: every entry of
# <path.sysfs>/class/powercap with a readable "name" file is a zone; it needs "max_energy_range_uj" next to it and
# reads "energy_uj" at each scrape. The index label comes from the entry name (intel-rapl:N[:M]).
LAYOUT_HINT = (
    "node_exporter reads <path.sysfs>/class/powercap/<entry>/{name,max_energy_range_uj,energy_uj} for every "
    "entry with a name file; --path.sysfs must be the directory that holds class/ (the fake tree's .sysfs)"
)


def measure(proc: ManagedProcess, ctx: Context) -> dict[str, Any]:
    d = ctx.durations
    time.sleep(d.versus_warmup_s)
    proc.check_alive()
    pid = proc.pid
    n = d.versus_scrapes
    window_s = n / d.versus_rate_hz
    with Scraper(proc.port, gzip_ok=True) as scraper:
        text = scraper.text()  # also opens the connection (and the server's thread for it) before the windows
        time.sleep(0.5)
        before = cpu_sample(pid)
        time.sleep(window_s)
        idle = cpu_delta(before, cpu_sample(pid))

        gz_bytes = 0
        before = cpu_sample(pid)
        for i in range(n):
            sleep_until(before.mono_s + i / d.versus_rate_hz)
            body, encoding = scraper.get()
            if encoding != "gzip":
                raise BenchError(f"{proc.name} answered without gzip (Content-Encoding {encoding!r})")
            gz_bytes = len(body)
        sleep_until(before.mono_s + window_s)
        scraped = cpu_delta(before, cpu_sample(pid))
    proc.check_alive()
    idle_cpu_scaled = idle.per_wall_s * scraped.wall_s
    per_scrape_us = (scraped.cpu_s - idle_cpu_scaled) / n * 1e6
    return {
        "text": text,
        "per_scrape_us": per_scrape_us,
        "idle": idle.to_json(),
        "scraping": scraped.to_json(),
        "scrapes": n,
        "rate_hz": d.versus_rate_hz,
        "body_bytes": len(text.encode()),
        "gzip_bytes": gz_bytes,
        "series": series(text),
    }


def promtool_check(text: str) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        return "promtool not found"
    try:
        out = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"promtool failed: {exc}"
    problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return "ok" if out.returncode == 0 and not problems else f"{len(problems)} lint problem(s): {problems[:3]}"


def run(ctx: Context) -> list[Result]:
    with stopping(ctx.start_node_exporter()) as node:
        theirs = measure(node, ctx)
    rapl_series = series(theirs["text"], "node_rapl_")
    if rapl_series == 0:
        raise BenchError(f"node_exporter exported no node_rapl_* series from {ctx.rapl.sysfs}. {LAYOUT_HINT}")
    # The same, without its own go_*/process_*/promhttp_* metrics: what its rapl collector alone costs.
    with stopping(ctx.start_node_exporter(["--web.disable-exporter-metrics"])) as node:
        bare = measure(node, ctx)
    with stopping(ctx.start_agent("agent-versus")) as agent:
        ours = measure(agent, ctx)
    our_energy = series(ours["text"], "wattmeter_gpu_energy_joules") + series(
        ours["text"], "wattmeter_cpu_energy_joules"
    )

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
        return float(a["per_scrape_us"] / b["per_scrape_us"]) if b["per_scrape_us"] > 0 else float("inf")

    def details(m: dict[str, Any]) -> dict[str, Any]:
        keys = ("idle", "scraping", "scrapes", "rate_hz", "body_bytes", "gzip_bytes", "series")
        return {k: m[k] for k in keys}

    n = ctx.durations.versus_scrapes
    main_ratio = ratio(ours, theirs)
    return [
        Result(
            NAME,
            f"node_exporter (rapl only) CPU per scrape (n={n}, gzip)",
            round(theirs["per_scrape_us"], 1),
            "us",
            details=details(theirs),
        ),
        Result(
            NAME,
            f"agent (8 GPUs + RAPL) CPU per scrape (n={n}, gzip)",
            round(ours["per_scrape_us"], 1),
            "us",
            details=details(ours),
        ),
        Result(
            NAME,
            "CPU per scrape ratio, agent / node_exporter",
            round(main_ratio, 2),
            "x",
            f"<= {TARGET_RATIO:g}",
            check(main_ratio, "<=", TARGET_RATIO),
        ),
        Result(
            NAME,
            "node_exporter series (all / node_rapl_*)",
            f"{theirs['series']} / {rapl_series}",
            "series",
            details={"rapl_zones_in_fake_tree": ctx.rapl.zones},
        ),
        Result(NAME, "agent series (all / energy)", f"{ours['series']} / {our_energy}", "series"),
        Result(
            NAME,
            "CPU per series per scrape, agent / node_exporter",
            f"{ours['per_scrape_us'] / ours['series']:.2f} / {theirs['per_scrape_us'] / theirs['series']:.2f}",
            "us",
        ),
        Result(
            NAME, "gzip body bytes, agent / node_exporter", f"{ours['gzip_bytes']} / {theirs['gzip_bytes']}", "bytes"
        ),
        Result(
            NAME,
            "node_exporter --web.disable-exporter-metrics CPU per scrape (info)",
            round(bare["per_scrape_us"], 1),
            "us",
            details=details(bare),
        ),
        Result(
            NAME,
            "CPU per scrape ratio, agent / node_exporter without its self-metrics (info)",
            round(ratio(ours, bare), 2),
            "x",
        ),
        Result(NAME, "promtool check metrics (agent)", promtool_check(ours["text"])),
    ]
