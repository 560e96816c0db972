"""Request store throughput: spans/s through ``write_span_columns`` and results/s through ``write_result_columns``
(the columnar calls ``ReportSpans`` and the request engine make) on a fresh SQLite store, with the engine's reads
between them (``pending_request_counts``; ``request_span_columns`` and ``spans_overlapping_columns``, which the engine
makes only after a restart or for spans older than its memory), 10,000 spans per transaction.

    python -m bench.store_requests [--spans 200000] [--batch 10000] [--hosts 8] [--dir DIR] [--url postgresql://...]

Each span is written once, read back once by the engine and its request's result written once: the store's share of
issue 5's end-to-end target (100,000 spans/s through ReportSpans into SQLite, finalised, in one aggregator process).
Request ids are random hex, as vLLM's are, so index inserts land anywhere in the tree. Wall and CPU time are both
reported: on a shared machine the CPU time of this process is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench.common import Context, Result
from collector.store import Store, open_store
from collector.store.base import ResultColumns, SpanColumns, SpanRow
from collector.store.spans import hosts_text
from collector.store.sqlite import SqliteStore

T = TypeVar("T")
S = 1_000_000_000
T0_NS = 1_800_000_000 * S
CONCURRENT = 1_000  # requests running at once on each host
REQUEST_S = 2.0
SPANS = {True: 50_000, False: 200_000}  # quick, full


def make_spans(count: int, hosts: int, first: int, rng: random.Random) -> list[SpanRow]:
    """``count`` one-span requests spread over ``hosts``, each host running CONCURRENT at a time."""
    gap_ns = round(REQUEST_S * S / CONCURRENT)
    spans = []
    for i in range(first, first + count):
        host, slot = i % hosts, i // hosts
        start = T0_NS + slot * gap_ns
        spans.append(
            SpanRow(
                request_id=f"{rng.getrandbits(128):032x}",
                span_id=f"{rng.getrandbits(64):016x}",
                hostname=f"gpu-node-{host:02d}",
                start_ns=start,
                end_ns=start + round(REQUEST_S * S),
                pid=1000 + host,
                model="llama-3.1-8b",
                tenant=f"tenant-{i % 7}",
                input_tokens=512,
                output_tokens=128,
                received_ns=start + round(REQUEST_S * S),
            )
        )
    return spans


def results_of(spans: SpanColumns) -> ResultColumns:
    """A final result for each of ``spans`` (one-span requests), as the engine writes them."""
    n = len(spans)
    return ResultColumns(
        list(spans.request_id), ["final"] * n, list(spans.model), list(spans.tenant),
        [hosts_text([host]) for host in spans.hostname], list(spans.start_ns), list(spans.end_ns),
        list(spans.input_tokens), list(spans.output_tokens), [40.0] * n, [55.0] * n, [36.0] * n, [3.0] * n,
        [1.0] * n, [1] * n, list(spans.end_ns),
    )  # fmt: skip


class Timer:
    def __init__(self) -> None:
        self.wall_s: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}

    def __call__(self, name: str, work: Callable[[], T]) -> T:
        wall, cpu = time.perf_counter(), time.process_time()
        value = work()
        self.wall_s[name] = self.wall_s.get(name, 0.0) + time.perf_counter() - wall
        self.cpu_s[name] = self.cpu_s.get(name, 0.0) + time.process_time() - cpu
        return value


def run(
    spans: int = 200_000, batch: int = 10_000, hosts: int = 8, directory: Path | None = None, url: str | None = None
) -> dict[str, float]:
    rng = random.Random(5)
    batches = [
        SpanColumns.of(make_spans(min(batch, spans - first), hosts, first, rng)) for first in range(0, spans, batch)
    ]
    workdir: Path | None = None
    if url is None:
        workdir = Path(tempfile.mkdtemp(prefix="wattmeter-bench-requests-", dir=directory))
        store: Store = SqliteStore(workdir / "aggregator.db")
    else:
        store = open_store(url)
    timer = Timer()
    try:
        store.migrate()
        for spans_in in batches:
            new = timer("write_spans", lambda: store.write_span_columns(spans_in))  # noqa: B023 (called at once)
            if len(new) != len(spans_in):
                raise RuntimeError(f"write_span_columns stored {len(new)} of {len(spans_in)} new spans")
            pending = timer("pending_requests", lambda: store.pending_request_counts(len(spans_in)))  # noqa: B023
            read = timer("request_spans", lambda: store.request_span_columns([rid for rid, _ in pending]))  # noqa: B023
            window = (spans_in.start_ns[0], spans_in.end_ns[-1])
            timer(
                "spans_overlapping",
                lambda: [store.spans_overlapping_columns(f"gpu-node-{h:02d}", *window) for h in range(hosts)],  # noqa: B023
            )
            results = results_of(read)
            stale = timer("write_request_results", lambda: store.write_result_columns(results))  # noqa: B023
            if stale:
                raise RuntimeError(f"write_result_columns found {len(stale)} of {len(spans_in)} results stale")
        if store.pending_requests(1):
            raise RuntimeError("requests left pending")
        figures: dict[str, float] = {"spans": float(spans), "batch": float(batch)}
        for name in timer.wall_s:
            figures[f"{name}_ms_per_batch"] = timer.wall_s[name] * 1e3 / len(batches)
            figures[f"{name}_cpu_ms_per_batch"] = timer.cpu_s[name] * 1e3 / len(batches)
        figures["write_spans_per_s"] = spans / timer.wall_s["write_spans"]
        figures["write_results_per_s"] = spans / timer.wall_s["write_request_results"]
        figures["cycle_spans_per_s"] = spans / sum(timer.wall_s.values())
        figures["cycle_spans_per_cpu_s"] = spans / sum(timer.cpu_s.values())
        if workdir is not None:
            figures["bytes_per_span"] = sum(f.stat().st_size for f in workdir.iterdir()) / spans
        return figures
    finally:
        store.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def bench_run(ctx: Context) -> list[Result]:
    """(informational) bench/run.py's rows: the store's share of the end-to-end request target."""
    spans = SPANS[ctx.quick]
    figures = run(spans=spans, directory=ctx.workdir)
    where = f"SQLite, {spans:,} one-span requests, 10,000 a transaction"
    return [
        Result(
            "store_requests", f"write_span_columns: spans/s ({where})", round(figures["write_spans_per_s"]), "spans/s"
        ),
        Result(
            "store_requests",
            f"write_result_columns: results/s ({where})",
            round(figures["write_results_per_s"]),
            "results/s",
        ),
        Result(
            "store_requests",
            "the store's whole cycle per span (write, pending, read, neighbours, result): spans/s wall / per CPU s",
            f"{figures['cycle_spans_per_s']:,.0f} / {figures['cycle_spans_per_cpu_s']:,.0f}",
            "spans/s",
            details=figures,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_requests", description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=SPANS[False])
    parser.add_argument("--batch", type=int, default=10_000, help="spans per write_span_columns call (a transaction)")
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="where the database goes (default: the temp dir)")
    parser.add_argument("--url", default=None, help="use this store instead (postgresql://...)")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = run(args.spans, args.batch, args.hosts, args.dir, args.url)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
