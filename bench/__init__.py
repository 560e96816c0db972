"""Benchmarks for the wattmeter agent: CPU overhead, scrape latency, peak RSS and a side-by-side with node_exporter.

Run them all with ``make bench`` (``BENCH_ARGS="--quick"`` for a short smoke run, ``--only NAME`` for one).
Results print as a markdown table and land in ``bench/results/latest.json``.
"""
