"""The streaming benchmarks that also run on their own (``python -m bench.stream``, ``bench.spool``, ``bench.store``)
as ``bench.run`` rows: each adapter runs one with the run's durations and turns its figures into ``Result``s.
"""

from __future__ import annotations

from typing import Any

from bench import spool, store, stream
from bench.common import BenchError, Context, Result

STORE_SECONDS = {True: 5, False: 20}  # quick, full: seconds of a 100-host fleet's telemetry written


def _figure(figures: dict[str, Any], key: str, where: str) -> Any:
    try:
        return figures[key]
    except KeyError:
        raise BenchError(f"{where} reported no {key!r} (its figures: {', '.join(figures)})") from None


def stream_run(ctx: Context) -> list[Result]:
    """The agent side of streaming: spool bytes per hour per GPU, and the agent CPU [stream] adds."""
    d = ctx.durations
    figures = stream.run(window_s=d.overhead_window_s, warmup_s=d.warmup_s)
    details = {key: value for key, value in figures.items() if key != "machine"}
    setting = f"{figures.get('gpus', '?')} GPUs at 10 Hz + RAPL, workload attribution on, fsync always"
    return [
        Result(
            "stream",
            f"agent spool bytes written per hour per GPU ({setting})",
            _figure(figures, "spool_bytes_per_hour_per_gpu", "bench.stream"),
            "B/h",
            details=details,
        ),
        Result(
            "stream",
            "agent spool per GPU per day",
            _figure(figures, "spool_mib_per_day_per_gpu", "bench.stream"),
            "MiB/day",
        ),
        Result(
            "stream",
            "extra agent CPU of streaming (same agent with and without [stream]), CPU-s per wall-s",
            _figure(figures, "stream_extra_cpu_s_per_s", "bench.stream"),
            "CPU-s/s",
            details={
                "with": figures.get("agent_cpu_s_per_s_with_stream"),
                "without": figures.get("agent_cpu_s_per_s_without_stream"),
                "method": figures.get("cpu_method"),
            },
        ),
    ]


def spool_run(ctx: Context) -> list[Result]:
    """(informational) The spool's own costs, on the bench's temp directory's filesystem."""
    figures = spool.run(ctx.workdir)
    units = {"us": "us", "bytes": "B"}
    return [
        Result("spool", name.replace("_", " "), value, next((u for k, u in units.items() if f"_{k}_" in name), ""))
        for name, value in figures.items()
    ]


def store_run(ctx: Context) -> list[Result]:
    """(informational) The SQLite store alone, written from 8 threads: the ceiling of what ingest can reach."""
    seconds = STORE_SECONDS[ctx.quick]
    figures = store.run(hosts=100, seconds=seconds, threads=8, directory=ctx.workdir)
    rate = _figure(figures, "samples_per_s", "bench.store")
    return [
        Result(
            "store",
            f"SQLite store alone: samples/s written, 100 hosts x {seconds} s, 8 threads, one transaction per batch",
            round(rate),
            "samples/s",
            details=figures,
        ),
        Result(
            "store",
            "SQLite store alone: write p50 / p99 per batch",
            f"{figures.get('write_p50_ms', float('nan')):.2f} / {figures.get('write_p99_ms', float('nan')):.2f}",
            "ms",
        ),
    ]
