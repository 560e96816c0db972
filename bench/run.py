"""Run the benchmarks: ``python -m bench.run [--quick] [--only NAME ...]``.

Prints a markdown table (metric, value, target, pass/fail) and writes ``bench/results/latest.json``.
Exit status: 0 when every benchmark ran (targets missed or not; ``--strict`` makes a miss exit 1), 2 when a
benchmark could not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import (
    adapters,
    ingest,
    latency,
    overhead,
    render,
    request_kernel,
    requests_e2e,
    rss,
    store_requests,
    versus,
    workloads,
)
from bench.common import BenchError, Context, Result, machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Order matters for the shared agent: overhead measures it untouched, rss reads its peak after the scraping.
BENCHMARKS: dict[str, tuple[Callable[[Context], list[Result]], str]] = {
    "overhead": (overhead.run, "agent CPU per wall second, idle and with a scrape every 15 s; thread count"),
    "latency": (latency.run, "/metrics latency p50/p99: keep-alive, fresh connections, gzip, paced"),
    "rss": (rss.run, "agent peak RSS (VmHWM) after idle and after scraping"),
    "versus": (versus.run, "CPU per scrape vs node_exporter's rapl collector on the same fake tree"),
    "render": (render.run, "(informational) in-process render cost and a cProfile of it"),
    "workloads": (
        workloads.run,
        "agent CPU with workload attribution: 16 GPU processes, 2,000 host processes scanned at 1 Hz; scan cost",
    ),
    "ingest": (
        ingest.run,
        "aggregator ingest: samples/s stored on SQLite from 100 simulated agents over loopback gRPC; its CPU",
    ),
    "stream": (adapters.stream_run, "agent spool bytes per hour per GPU and the extra agent CPU of [stream]"),
    "spool": (adapters.spool_run, "(informational) spool append per fsync policy, replay, bytes per record"),
    "store": (adapters.store_run, "(informational) the SQLite store alone: samples/s from 8 threads, write latency"),
    "request_kernel": (request_kernel.bench_run, "request attribution kernel: spans/s, 1,000,000 at 1,000 concurrent"),
    "requests": (requests_e2e.run, "energy per request end to end: spans/s through ReportSpans into SQLite, finalised"),
    "store_requests": (
        store_requests.bench_run,
        "(informational) SQLite request store: spans/s written, results/s written, the engine's reads between",
    ),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows and few requests (a smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        choices=sorted(BENCHMARKS),
        help="run only this benchmark (repeatable): " + ", ".join(BENCHMARKS),
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json", help="JSON results path")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def fmt_value(result: Result) -> str:
    value = result.value
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} {result.unit}".strip() if result.unit and result.unit not in ("series",) else text


def verdict(result: Result) -> str:
    if result.passed is None:
        return "-"
    return "PASS" if result.passed else "**FAIL**"


def table(results: Sequence[Result]) -> str:
    rows = ["| benchmark | metric | value | target | pass/fail |", "|---|---|---|---|---|"]
    for r in results:
        metric = r.metric.replace("|", "\\|")
        rows.append(
            f"| {r.benchmark} | {metric} | {fmt_value(r).replace('|', '/')} | {r.target or '-'} | {verdict(r)} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, (_, description) in BENCHMARKS.items():
            print(f"{name:10} {description}")
        return 0
    selected = [name for name in BENCHMARKS if not args.only or name in args.only]
    machine = machine_info()
    print(f"# wattmeter bench ({'quick' if args.quick else 'full'}): {', '.join(selected)}", flush=True)
    print(
        f"machine: nproc={machine['nproc']}, {machine['cpu_model']}, kernel {machine['kernel']}, "
        f"python {machine['python']}, {machine.get('node_exporter', 'node_exporter: not found')}",
        flush=True,
    )

    results: list[Result] = []
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    started = time.monotonic()
    with Context(quick=args.quick) as ctx:
        for name in selected:
            print(f"- {name} ...", end=" ", flush=True)
            t0 = time.monotonic()
            try:
                got = BENCHMARKS[name][0](ctx)
            except (BenchError, OSError) as exc:
                errors[name] = str(exc)
                print(f"ERROR: {exc}", flush=True)
            except Exception as exc:
                errors[name] = "".join(traceback.format_exception(exc))
                print(f"ERROR: {type(exc).__name__}: {exc}", flush=True)
            else:
                results.extend(got)
                print(f"done in {time.monotonic() - t0:.0f} s", flush=True)
            timings[name] = time.monotonic() - t0

    print()
    print(table(results))
    for name, message in errors.items():
        print(f"\n{name}: could not run: {message}")
    missed = [r for r in results if r.passed is False]
    print(
        f"\n{sum(1 for r in results if r.passed)} passed, {len(missed)} missed, {len(errors)} errors "
        f"in {time.monotonic() - started:.0f} s"
    )

    report: dict[str, Any] = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "benchmarks": selected,
        "machine": machine,
        "durations": vars(ctx.durations),
        "seconds": timings,
        "results": [r.to_json() for r in results],
        "errors": errors,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {args.output}")
    if errors:
        return 2
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
