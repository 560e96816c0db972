"""Review of 9aeb325: how the request engine counts requests across no_samples, reopens, restarts and eviction."""

from __future__ import annotations

import pytest

from collector.aggregator.request_engine import PassStats
from collector.store.base import SpanRow, Store
from tests.aggregator.test_request_engine import Clock, constant_host, result
from tests.aggregator.test_request_metrics_review import _late_samples, _values, engine_and_metrics, reopen, span
from tests.fakes.request_world import T0, HostWriter, S

TOTAL = 'wattmeter_requests_total{model="m",tenant="t"}'


def _consistent(stats: PassStats) -> PassStats:
    assert stats.finished + stats.revised == stats.written, stats
    return stats


def _one_pass_before_a_restart(store: Store, request_id: str, seconds: int) -> tuple[HostWriter, Clock]:
    """host-a at 100 W for ``seconds``, a span of ``request_id`` in [2, 8] s, and a pass of an engine (a) at
    T0 + 38 s, before a restart: host-a's writer and the clock."""
    writer = constant_host(store, seconds=seconds)
    store.write_spans([span(request_id)])
    clock = Clock(T0 + 38 * S)
    a, _ = engine_and_metrics(store, clock)
    a.run_pass()
    return writer, clock


def test_control_restart_then_reopen_told_before_the_pass_is_a_revision(store: Store) -> None:
    """The design: r counted before a restart (engine a), reopened by late samples after it (engine b, told): b
    revises r, it does not count it."""
    writer, clock = _one_pass_before_a_restart(store, "r", seconds=5)
    assert result(store, "r").status == "approximate"
    b, metrics = engine_and_metrics(store, clock)  # after a restart
    assert reopen(store, b, writer, 5) == {"r": "approximate"}
    clock.now_ns += S
    _consistent(b.run_pass())
    assert result(store, "r").status == "final"
    assert _values(metrics).get(TOTAL, 0.0) == 0.0


def test_a_pass_between_the_reopen_s_commit_and_its_note_does_not_count_a_reopened_request_again(store: Store) -> None:
    """The service notes what the reopen returns inside ``reopening()``, under the results lock: a pass right after
    it (its store check due: every 5 s, or the first after a restart) reads r pending and computes it final, and
    knows that r was counted already. Before, the note came after the lock was let go, and such a pass counted r as
    new. Same sequence as the control above, only the pass comes before ``note_requests_reopened()``."""
    writer, clock = _one_pass_before_a_restart(store, "r", seconds=5)
    b, metrics = engine_and_metrics(store, clock)
    _late_samples(writer, 5, 20)
    with b.reopening("host-a", T0 + 5 * S + S // 10, T0 + 20 * S) as counted:  # as the service does it
        counted.update(store.reopen_requests("host-a", T0 + 5 * S + S // 10, T0 + 20 * S))
    clock.now_ns += S
    _consistent(b.run_pass())  # the engine thread, before the executor's note_requests_reopened()
    b.note_requests_reopened()
    assert result(store, "r").status == "final"
    assert _values(metrics).get(TOTAL, 0.0) == 0.0  # a revision, as in the control


@pytest.mark.parametrize("remembered", [1, 100])  # 100: the control, nothing evicted
def test_reopened_requests_remembered_as_counted_are_evicted_before_they_are_computed(
    store: Store, monkeypatch: pytest.MonkeyPatch, remembered: int
) -> None:
    """The reopened ids are kept apart until each is written: a pass takes only max_per_pass of them, and the
    writes of that pass (and later ones) must not evict the rest before they are computed, as they did when the ids
    were merged into what the engine remembers writing. REMEMBERED = 1 stands for 200,000 writes before the engine
    reaches them."""
    from collector.aggregator import request_engine

    monkeypatch.setattr(request_engine, "REMEMBERED", remembered)
    wa = constant_host(store, "host-a", seconds=5)
    wb = constant_host(store, "host-b", seconds=5)
    store.write_spans([span("r1", "host-a")])
    store.write_spans([span("r2", "host-b")])
    clock = Clock(T0 + 38 * S)
    engine, metrics = engine_and_metrics(store, clock, max_per_pass=1)
    for _ in range(4):
        engine.run_pass()
        clock.now_ns += S
    assert (result(store, "r1").status, result(store, "r2").status) == ("approximate", "approximate")
    assert _values(metrics)[TOTAL] == 2.0
    reopen(store, engine, wa, 5, "host-a")
    reopen(store, engine, wb, 5, "host-b")
    for _ in range(4):
        clock.now_ns += S
        _consistent(engine.run_pass())
    assert (result(store, "r1").status, result(store, "r2").status) == ("final", "final")
    assert _values(metrics)[TOTAL] == 2.0  # r1 and r2, once each


def test_a_no_samples_neighbour_written_elsewhere_that_late_samples_price_is_counted_with_energy(
    store: Store,
) -> None:
    """n was written no_samples before a restart (engine a). Late samples arrive; before their reopen runs (it is
    on the executor), engine b's pass computes a new request p beside n: n, a neighbour, comes out final. Its stored
    status (no_samples) says it was not counted with energy, so it is now; the reopen then finds n final and has
    nothing to reopen. Before, a neighbour this engine never wrote was taken as counted with its energy, and n's
    energy was never counted. (A no_samples neighbour that b itself wrote: the control below.)"""
    writer, clock = _one_pass_before_a_restart(store, "n", seconds=1)
    assert result(store, "n").status == "no_samples"
    b, metrics = engine_and_metrics(store, clock)  # after a restart
    _late_samples(writer, 1, 20)
    store.write_spans([span("p", start_s=4, end_s=10)])
    clock.now_ns = T0 + 10 * S + 40 * S
    stats = _consistent(b.run_pass())
    assert (result(store, "p").status, result(store, "n").status) == ("final", "final")
    assert store.reopen_requests("host-a", T0 + S + S // 10, T0 + 20 * S) == {}
    assert stats.written == 2
    assert _values(metrics).get(TOTAL, 0.0) == 2.0  # p, and n now that it has its energy


def test_same_engine_no_samples_neighbour_priced_is_counted_with_energy(store: Store) -> None:
    """Control of the one above without the restart: n written no_samples by this engine, priced as a neighbour."""
    writer = constant_host(store, seconds=1)
    store.write_spans([span("n")])
    clock = Clock(T0 + 38 * S)
    engine, metrics = engine_and_metrics(store, clock)
    engine.run_pass()
    _late_samples(writer, 1, 20)
    store.write_spans([span("p", start_s=4, end_s=10)])
    clock.now_ns = T0 + 10 * S + 40 * S
    stats = _consistent(engine.run_pass())
    assert (result(store, "p").status, result(store, "n").status) == ("final", "final")
    assert stats.finished == 2
    assert _values(metrics)[TOTAL] == 2.0
    assert _values(metrics)["wattmeter_requests_no_samples_total"] == 1.0


def test_no_samples_reopened_then_final_then_late_span_counts_once_with_energy(store: Store) -> None:
    """pending -> no_samples -> reopened -> final -> a late span of its own -> final again: counted once as
    no_samples, once with energy, then revisions."""
    writer = constant_host(store, seconds=1)
    store.write_spans([span("r")])
    clock = Clock(T0 + 38 * S)
    engine, metrics = engine_and_metrics(store, clock)
    _consistent(engine.run_pass())
    reopen(store, engine, writer, 1)
    clock.now_ns += S
    _consistent(engine.run_pass())
    assert result(store, "r").status == "final"
    store.write_spans([SpanRow("r", "s2", "host-a", T0 + 9 * S, T0 + 10 * S, workload="vllm", model="m", tenant="t")])
    clock.now_ns = T0 + 60 * S
    for _ in range(3):
        _consistent(engine.run_pass())
        clock.now_ns += 10 * S
    assert result(store, "r").status == "final"
    values = _values(metrics)
    assert values[TOTAL] == 1.0
    assert values["wattmeter_requests_no_samples_total"] == 1.0
