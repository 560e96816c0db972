"""Conservation through the engine with several spans per request on two hosts, late spans of requests already
final (three waves), restarts between waves, a small span memory and full passes: requests get exactly the energy
of the time their spans cover, and nothing stays pending."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.aggregator.config import RequestsConfig
from collector.aggregator.request_engine import RequestEngine
from collector.aggregator.request_window import SpanWindow
from collector.store.base import SpanRow
from tests.aggregator.test_request_engine_conservation import measured_store, samples, union_energy
from tests.fakes.request_world import T0, S

MS = 1_000_000
HOSTS = ("host-a", "host-b")


Scenario = tuple[
    list[int],
    list[float],
    list[tuple[int, int, tuple[int, int]]],
    tuple[int, int],
    int,
    tuple[bool, bool, bool],
    int | None,
]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    times, energy = samples(draw, 40)
    span_ms = int(times[-1] // MS)
    spans = draw(
        st.lists(
            st.tuples(
                st.integers(0, 5),
                st.integers(0, draw(st.integers(0, 1))),
                st.tuples(st.integers(0, span_ms), st.integers(0, span_ms)).map(lambda p: (min(p), max(p))),
            ),
            min_size=1,
            max_size=20,
        )
    )
    cut1 = draw(st.integers(0, len(spans)))
    cut2 = draw(st.integers(cut1, len(spans)))
    per_pass = draw(st.integers(1, 8))
    restarts = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    max_spans = draw(st.one_of(st.none(), st.integers(1, 8)))
    return times.tolist(), energy.tolist(), spans, (cut1, cut2), per_pass, restarts, max_spans


def run(scenario: Scenario) -> None:
    times_ms, energy, spans, (cut1, cut2), per_pass, restarts, max_spans = scenario
    times = T0 + np.array(times_ms, dtype=np.int64)
    joules = np.array(energy)
    with measured_store(HOSTS, times, joules) as store:
        rows = [
            SpanRow(f"r{r}", f"s{i}", HOSTS[h], int(T0 + a * MS), int(T0 + b * MS), workload="vllm")
            for i, (r, h, (a, b)) in enumerate(spans)
        ]

        def new_engine() -> RequestEngine:
            window = SpanWindow(max_spans=max_spans) if max_spans else None
            return RequestEngine(
                store,
                RequestsConfig(max_per_pass=per_pass),
                clock_ns=lambda: T0 + 10**6 * S,
                monotonic=lambda: 1e3,
                window=window,
            )

        engine = new_engine()
        for wave, restart in zip((rows[:cut1], rows[cut1:cut2], rows[cut2:]), restarts, strict=True):
            if restart:
                engine = new_engine()
            if wave:
                store.write_spans(wave)
            for _ in range(200):
                if not store.pending_requests(1) and not engine._known:
                    break
                engine.run_pass()
            assert store.pending_requests(1) == [], "pending forever"
            assert not engine._known, f"known forever: {list(engine._known)}"
        ids = sorted({r.request_id for r in rows})
        results = [store.request(rid) for rid in ids]
        assert all(r is not None and r.status == "final" for r in results), results
        attributed = sum(r.active_j or 0.0 for r in results if r is not None)
        total = float(joules[-1] - joules[0])
        expected = 0.0
        for h in range(len(HOSTS)):
            on = [(a * MS, b * MS) for (_, on_host, (a, b)) in spans if on_host == h]
            if on:
                expected += union_energy(times - T0, joules, on)
        assert abs(attributed - expected) <= 1e-9 * max(total, 1e-300), (attributed, expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_requests_get_the_energy_of_their_spans_through_late_spans_and_restarts(scenario: Scenario) -> None:
    run(scenario)
