"""bench/store.py runs and counts what it wrote (its speed is measured by running it, not here)."""

from __future__ import annotations

from pathlib import Path

from bench import store as bench_store


def test_the_store_benchmark_writes_its_fleet(tmp_path: Path) -> None:
    result = bench_store.run(hosts=2, seconds=3, threads=2, directory=tmp_path)
    per_batch = bench_store.GPUS * bench_store.SAMPLES * (1 + bench_store.WORKLOADS_PER_GPU)
    assert result["samples"] == 2 * 3 * per_batch
    assert result["samples_per_s"] > 0
    assert 16 <= result["bytes_per_sample"] < 1_000  # at least the packed time and energy
    assert list(tmp_path.iterdir()) == []  # its database is removed
