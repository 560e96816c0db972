"""Conservation through the whole engine (store, clusters, neighbours, passes, late spans, revisions), not only the
kernel: once nothing is pending, the requests' active energy plus the energy of the times when none ran equals the
workload's energy, to 1e-9 relative."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.aggregator.config import RequestsConfig
from collector.aggregator.request_engine import RequestEngine
from collector.store import open_store
from collector.store.base import SpanRow, Store
from tests.fakes.request_world import T0, WORKLOAD, HostWriter, S

MS = 1_000_000


def samples(draw: st.DrawFn, max_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample times (ns after T0, 1-400 ms apart) and a workload's cumulative energy at them (0-500 J a step)."""
    n_samples = draw(st.integers(2, max_samples))
    gaps = draw(st.lists(st.integers(1, 400), min_size=n_samples - 1, max_size=n_samples - 1))
    times = np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64) * MS
    steps = draw(st.lists(st.floats(0.0, 500.0), min_size=n_samples - 1, max_size=n_samples - 1))
    return times, np.concatenate([[0.0], np.cumsum(steps)])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[float], list[tuple[int, int]], int, int, bool]:
    times, energy = samples(draw, 60)
    span_ms = int(times[-1] // MS)
    spans = draw(
        st.lists(
            st.tuples(st.integers(0, span_ms), st.integers(0, span_ms)).map(lambda p: (min(p), max(p))),
            min_size=1,
            max_size=25,
        )
    )
    late = draw(st.integers(0, len(spans)))  # spans from here on arrive after a first round of passes
    per_pass = draw(st.integers(1, 30))
    before = draw(st.booleans())  # the first wave stored before the engine began (a restart): the store's list
    return times.tolist(), energy.tolist(), [(a * MS, b * MS) for a, b in spans], late, per_pass, before


@contextlib.contextmanager
def measured_store(hosts: Sequence[str], times: np.ndarray, joules: np.ndarray) -> Iterator[Store]:
    """A fresh SQLite store where gpu0 of each host gave the workload ``joules`` at ``times`` (ns); the device
    reports 5 s past the last workload sample (the workload flat there), so every span can be final."""
    with tempfile.TemporaryDirectory() as directory:
        store = open_store(f"sqlite:///{Path(directory) / 'a.db'}")
        try:
            store.migrate()
            device_t = np.append(times, times[-1] + 5 * S)
            device_j = np.append(joules, joules[-1]) + 100.0
            for host in hosts:
                HostWriter(store, host).write(
                    "gpu0", "gpu", device_t, device_j, None, {WORKLOAD: np.append(joules, joules[-1])}
                )
            yield store
        finally:
            store.close()


def union_energy(times: np.ndarray, energy: np.ndarray, spans: list[tuple[int, int]]) -> float:
    """The workload's energy (linear between samples) over the union of the spans."""
    total = 0.0
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    for a, b in merged:
        ea, eb = np.interp([a, b], times.astype(np.float64), energy)
        total += float(eb - ea)
    return total


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_requests_plus_unattributed_equal_the_workload_energy(
    scenario: tuple[list[int], list[float], list[tuple[int, int]], int, int, bool],
) -> None:
    times_ms, energy, spans, late, per_pass, before = scenario
    times = T0 + np.array(times_ms, dtype=np.int64)
    joules = np.array(energy)
    with measured_store(["host-a"], times, joules) as store:
        rows = [
            SpanRow(f"r{i}", "s", "host-a", int(T0 + a), int(T0 + b), workload="vllm") for i, (a, b) in enumerate(spans)
        ]
        if before and late:
            store.write_spans(rows[:late])
        # the monotonic clock stands still: the store's list is read only when the engine needs it
        engine = RequestEngine(
            store, RequestsConfig(max_per_pass=per_pass), clock_ns=lambda: T0 + 10**6 * S, monotonic=lambda: 1e3
        )
        for wave in ([], rows[late:]) if before else (rows[:late], rows[late:]):
            if wave:
                store.write_spans(wave)
            for _ in range(100):
                if not store.pending_requests(1):
                    break
                engine.run_pass()
        assert store.pending_requests(1) == []
        results = [store.request(f"r{i}") for i in range(len(spans))]
        assert all(r is not None and r.status == "final" for r in results)
        attributed = sum(r.active_j or 0.0 for r in results if r is not None)
        total = float(joules[-1] - joules[0])
        unattributed = total - union_energy(times - T0, joules, spans)
        assert abs(attributed + unattributed - total) <= 1e-9 * max(total, 1e-300)
