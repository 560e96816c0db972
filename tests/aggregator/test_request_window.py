"""The request engine's memory of recent spans (``request_window``) against real stores (SQLite and PostgreSQL):
it is fed by the store's span writes, recovers pending requests from the store after a restart, and reads the store
for spans older than it holds; every path gives what the store alone gives."""

from __future__ import annotations

import numpy as np
import pytest

from collector.aggregator.config import RequestsConfig
from collector.aggregator.request_engine import RequestEngine
from collector.aggregator.request_window import SpanWindow
from collector.store.base import RequestResult, SpanColumns, SpanRow, Store
from tests.aggregator.test_request_engine import Clock, constant_host, result
from tests.fakes.request_world import T0, HostWriter, S, simulate, spans_of, write_simulation


def test_the_store_hands_new_spans_to_its_listeners_once_committed(store: Store) -> None:
    got: list[SpanColumns] = []
    store.add_span_listener(got.append)
    a = SpanRow("a", "s", "host-a", T0, T0 + S, workload="vllm", labels={"k": "v"})
    b = SpanRow("b", "s", "host-a", T0, T0 + 2 * S)
    assert store.write_spans([a, b]) == 2
    assert store.write_spans([a]) == 0  # stored already: nothing new to hand over
    assert store.write_spans([b, SpanRow("c", "s", "host-b", T0, T0 + S)]) == 1
    assert [columns.spans() for columns in got] == [[a, b], [SpanRow("c", "s", "host-b", T0, T0 + S)]]


def test_a_restart_finds_pending_requests_in_the_store_and_finalises_them_as_memory_does(store: Store) -> None:
    """Two hosts with the same samples and the same spans: host-a's spans were stored before the engine started
    (a restart: it reads them from the store), host-b's after (its memory holds them). Results must match."""
    sim = simulate(0, seconds=30)
    write_simulation(HostWriter(store, "host-a"), sim)
    write_simulation(HostWriter(store, "host-b"), sim)
    before = spans_of(sim, hostname="host-a", prefix="a")
    after = spans_of(sim, hostname="host-b", prefix="b")
    crashed = RequestEngine(store, RequestsConfig(), clock_ns=Clock(T0 + 61 * S))
    store.write_spans(before)  # in the crashed engine's memory only
    del crashed
    engine = RequestEngine(store, RequestsConfig(), clock_ns=Clock(T0 + 61 * S))
    store.write_spans(after)
    first = min(s.start_ns for s in before)
    assert not engine.window.covers("host-a", first)  # host-a: the store's, from before the start
    assert engine.window.covers("host-b", first)  # host-b: all in memory
    while engine.run_pass().pending:
        pass
    a = [result(store, s.request_id) for s in before]
    b = [result(store, s.request_id) for s in after]
    assert {r.status for r in a + b} == {"final"}
    assert np.array([r.active_j for r in b]) == pytest.approx(np.array([r.active_j for r in a]), rel=1e-9)
    assert np.array([r.full_j for r in b]) == pytest.approx(np.array([r.full_j for r in a]), rel=1e-9)
    assert np.array([r.active_j for r in a]) == pytest.approx(sim.truth_j, rel=0.05)


def _late_neighbour(store: Store, window: SpanWindow) -> tuple[RequestEngine, RequestResult, RequestResult]:
    constant_host(store, seconds=40)  # 100 W
    engine = RequestEngine(store, RequestsConfig(), clock_ns=Clock(T0 + 60 * S), window=window)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    engine.run_pass()
    assert result(store, "a").active_j == pytest.approx(400.0, rel=1e-9)
    # later spans move the window on, far from a's time
    store.write_spans([SpanRow(f"f{i}", "s", "host-a", T0 + (20 + i) * S, T0 + (21 + i) * S) for i in range(15)])
    engine.run_pass()
    store.write_spans([SpanRow("b", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm")])  # late
    stats = engine.run_pass()
    assert (stats.finished, stats.revised) == (1, 1)
    return engine, result(store, "a"), result(store, "b")


def test_a_late_span_older_than_the_window_revises_its_neighbours_from_the_store(store: Store) -> None:
    engine, a, b = _late_neighbour(store, SpanWindow(window_ns=5 * S, max_spans=8))
    assert not engine.window.covers("host-a", T0 + 2 * S)  # a was dropped from memory: read from the store
    assert len(engine.window) <= 8
    assert (a.status, b.status) == ("final", "final")
    assert a.active_j == pytest.approx(300.0, rel=1e-9)  # 2 s alone, 2 s shared with b
    assert b.active_j == pytest.approx(300.0, rel=1e-9)


def test_a_late_span_within_the_window_gives_the_same(store: Store) -> None:
    engine, a, b = _late_neighbour(store, SpanWindow())
    assert engine.window.covers("host-a", T0)  # all in memory
    assert a.active_j == pytest.approx(300.0, rel=1e-9)
    assert b.active_j == pytest.approx(300.0, rel=1e-9)


def test_a_request_with_spans_stored_elsewhere_is_read_from_the_store(store: Store) -> None:
    """A request's span written before the engine started (or by another aggregator) and one after: the memory
    holds one of its two spans, so the engine reads them from the store and sums both."""
    constant_host(store)
    store.write_spans([SpanRow("r", "s1", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    engine = RequestEngine(store, RequestsConfig(), clock_ns=Clock(T0 + 30 * S))
    store.write_spans([SpanRow("r", "s2", "host-a", T0 + 6 * S, T0 + 7 * S, workload="vllm")])
    assert engine.run_pass().pending == 1
    r = result(store, "r")
    assert (r.status, r.spans) == ("final", 2)
    assert r.active_j == pytest.approx(300.0, rel=1e-9)


def _held(window: SpanWindow) -> dict[str, list[tuple[str, str, int, int]]]:
    """Per request, (span, host, start, end) of the spans the window holds, read from its columns."""
    spans = window.spans
    out: dict[str, list[tuple[str, str, int, int]]] = {}
    for i, rid in enumerate(spans.request_id):
        out.setdefault(rid, []).append(
            (spans.span_id[i], spans.hostname[i], int(spans.start_ns[i]), int(spans.end_ns[i]))
        )
    return out


def test_dropped_spans_out_of_order_leave_every_request_s_other_spans_found() -> None:
    """Spans end out of order and requests have several: after drops in the middle of the columns, each request's
    numbers give exactly the spans of it still held, in the order they came."""
    rng = np.random.default_rng(7)
    clock = [0]
    window = SpanWindow(window_ns=20 * S, max_spans=300, monotonic_ns=lambda: clock[0])
    seen: set[str] = set()
    for batch in range(40):
        clock[0] += S  # a batch a second: spans go for age and, beyond 300, for number
        rows = []
        for j in range(int(rng.integers(1, 60))):
            rid = f"r{int(rng.integers(0, 400))}"
            end = T0 + batch * S + int(rng.integers(-8 * S, 3 * S))
            host = "host-a" if rng.random() < 0.7 else "host-b"
            rows.append(SpanRow(rid, f"s{batch}-{j}", host, end - S, end))
            seen.add(rid)
        window.add(SpanColumns.of(rows))
        window.refresh()
        held = _held(window)
        ids = sorted(seen)
        for rid, found in zip(ids, window.numbers(ids), strict=True):
            if rid not in held:
                assert found is None
                continue
            numbers = [found] if isinstance(found, int) else found
            hosts, start, end = window.extents(numbers)
            assert [(h, int(a), int(b)) for h, a, b in zip(hosts, start, end, strict=True)] == [
                (h, a, b) for _, h, a, b in held[rid]
            ]
    assert len(window) <= 300


@pytest.mark.parametrize("index", [[], [3], [2, 3, 4, 5], [5, 1, 1, 0], [0, 2, 4], np.arange(1, 6)])
def test_taking_spans_gives_the_spans_at_those_positions(index: list[int]) -> None:
    rows = [SpanRow(f"r{i}", f"s{i}", f"h{i % 2}", T0 + i, T0 + 10 + i, input_tokens=i) for i in range(7)]
    spans = SpanWindow()
    spans.add(SpanColumns.of(rows))
    spans.refresh()
    taken = spans.spans.take(index)
    assert taken.request_id == [rows[i].request_id for i in index]
    assert taken.hostname == [rows[i].hostname for i in index]
    assert taken.start_ns.tolist() == [rows[i].start_ns for i in index]
    assert taken.input_tokens.tolist() == [rows[i].input_tokens for i in index]


def test_spans_age_by_when_they_were_taken_in_not_by_their_times() -> None:
    """A burst of spans far ahead in span time keeps the older ones here while they are young; once taken in
    WINDOW_NS ago they go, and the window vouches only for times past the latest end dropped."""
    now = [0]
    window = SpanWindow(window_ns=60 * S, monotonic_ns=lambda: now[0])
    old = [SpanRow(f"o{i}", "s", "host-a", T0 + i * S, T0 + (i + 1) * S) for i in range(10)]
    window.add(SpanColumns.of(old))
    window.refresh()
    now[0] += 30 * S
    burst = [SpanRow(f"b{i}", "s", "host-a", T0 + (500 + i) * S, T0 + (501 + i) * S) for i in range(10)]
    window.add(SpanColumns.of(burst))
    window.refresh()
    assert len(window) == 20 and window.covers("host-a", T0)  # by span time, the old ones are 500 s behind
    now[0] += 31 * S  # the old ones were taken in 61 s ago, the burst 31 s ago
    window.refresh()
    assert sorted(_held(window)) == sorted(s.request_id for s in burst)
    assert window.numbers(["o3", "b3"])[0] is None
    assert not window.covers("host-a", T0 + 10 * S)  # o9 ended then: dropped
    assert window.covers("host-a", T0 + 10 * S + 1)
    now[0] += 30 * S
    window.refresh()
    assert len(window) == 0 and window.covers("host-a", T0 + 511 * S)
