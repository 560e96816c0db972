"""Review: schema step 7 (a process binding row per sighting), pruning bindings, and the engine's incremental read."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from collector.aggregator.request_resolve import HostBindings
from collector.store import Store, open_store
from collector.store.base import ProcessBindingRow, SpanRow
from collector.store.migrations import LATEST_VERSION
from tests.aggregator.test_request_engine import Clock, constant_host, engine_for, result
from tests.aggregator.test_stream_spans_review import BATCH_JOB, early_span_of_a_batch_job
from tests.fakes.request_world import T0, WORKLOAD, S
from tests.store.builders import T0_NS
from tests.store.old_schema import at_version, migrated, run

HOUR = 3600 * S


# -- the migration


def test_step_7_moves_many_hosts_and_nul_replaced_rows(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fill(cursor: Any) -> None:
        for h in range(50):
            cursor.execute("INSERT INTO span_hosts (hostname) VALUES (?)", (f"host-\ufffd{h}",))
        cursor.execute(
            "INSERT INTO process_bindings (host_ref, pid, workload, phase, job, seen_ns) "
            "SELECT id, id * 10, 'w\ufffdx', 'inference', 'j\ufffd', ? FROM span_hosts",
            (T0_NS,),
        )
        cursor.execute(
            "INSERT INTO process_bindings (host_ref, pid, workload, phase, job, seen_ns) "
            "SELECT id, id * 10, 'other', 'inference', '', ? FROM span_hosts",
            (T0_NS,),
        )  # one pid, two workloads at the same time: both kept

    at_version(store_url, monkeypatch, 6, fill)
    with migrated(store_url) as new:
        assert new.migrate() == LATEST_VERSION  # again: nothing
        rows = new.process_bindings("host-\x007")
        assert sorted(b.workload for b in rows) == ["other", "w\ufffdx"] and len(rows) == 2
        new.write_process_bindings(
            [ProcessBindingRow("host-\x007", rows[0].pid, "w\x00x", "inference", "j\x00", T0_NS)]
        )
        assert len(new.process_bindings("host-\ufffd7")) == 2  # the same sighting: once


def test_step_7_by_two_aggregators_starting_at_once(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    at_version(postgres_url, monkeypatch, 6, lambda cursor: None)
    stores = [open_store(postgres_url) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def start(one: Store) -> None:
        barrier.wait()
        try:
            one.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(one,)) for one in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        stores[0].write_process_bindings([ProcessBindingRow("h", 1, "w", "p", "j", 5)] * 2)
        stores[1].write_process_bindings([ProcessBindingRow("h", 1, "w", "p", "j", 5)])
        assert len(stores[2].process_bindings("h")) == 1

        def constraints(cursor: Any) -> list[str]:
            cursor.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'process_bindings'::regclass AND contype = 'u'"
            )
            return [str(name) for (name,) in cursor.fetchall()]

        assert len(run(stores[0], constraints)) == 1
    finally:
        for one in stores:
            one.close()


def test_prune_keeps_the_binding_in_effect_at_the_cutoff(store: Store) -> None:
    """pid 4242: batch-job from T0, vllm from T0 + 15 s. Pruning at a raw cutoff of T0 + 5 s keeps the spans that
    end after it; a batch-job span at 8..10 s must still resolve to batch-job (the binding in effect at the cutoff)."""
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *BATCH_JOB, T0)])
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *WORKLOAD, T0 + 15 * S)])
    store.prune(T0 + HOUR + 5 * S, raw_retention_s=3600, rollup_retention_s=86_400)
    bindings = HostBindings.of(store.process_bindings("host-a"))
    assert bindings.workload_at(4242, T0 + 10 * S) == "batch-job"


def test_prune_then_a_fresh_engine_computes_a_kept_span_by_the_binding_of_its_time(store: Store) -> None:
    constant_host(store, workloads={WORKLOAD: 0.75, BATCH_JOB: 0.25})
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *BATCH_JOB, T0)])
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *WORKLOAD, T0 + 15 * S)])
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 8 * S, T0 + 10 * S, pid=4242)])
    store.prune(T0 + HOUR + 5 * S, raw_retention_s=3600, rollup_retention_s=86_400)
    assert result(store, "r").status == "pending"  # its samples are kept
    engine_for(store, Clock(T0 + 60 * S), finalize_grace_s=10).run_pass()
    assert result(store, "r").active_j == pytest.approx(50.0, rel=1e-9)  # batch-job: 2 s x 25 W


def test_agent_restarts_add_rows_that_pruning_bounds(store: Store) -> None:
    """An agent sends every live binding again after each restart: a row each; pruning keeps the newest per pid."""
    for restart in range(30):
        store.write_process_bindings(
            [ProcessBindingRow("host-a", pid, *BATCH_JOB, T0 + restart * 60 * S) for pid in range(100, 120)]
        )
    assert len(store.process_bindings("host-a")) == 600
    store.prune(T0 + 2 * HOUR, raw_retention_s=3600, rollup_retention_s=86_400)
    assert len(store.process_bindings("host-a")) == 20


def test_prune_query_plan_on_sqlite(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    store.migrate()

    def plan(cursor: Any) -> list[str]:
        cursor.execute(
            "EXPLAIN QUERY PLAN DELETE FROM process_bindings WHERE seen_ns < ? AND EXISTS (SELECT 1 FROM "
            "process_bindings newer WHERE newer.host_ref = process_bindings.host_ref AND newer.pid = "
            "process_bindings.pid AND newer.seen_ns > process_bindings.seen_ns)",
            (5,),
        )
        return [str(row[-1]) for row in cursor.fetchall()]

    try:
        steps = run(store, plan)
        assert any("USING" in step and "INDEX" in step for step in steps), steps  # the EXISTS by the unique index
    finally:
        store.close()


# -- the engine's incremental read


def test_a_binding_stored_after_newer_ones_is_not_missed(store: Store) -> None:
    """pid 4242 batch-job from T0. The engine has read a binding of another pid seen at T0 + 200 s when the binding
    of 4242 to vllm from T0 + 10 s is stored (a batch stored late: another agent instance's spool replayed, a clock
    stepped back). A span of 4242 at 12..14 s is vllm's."""
    engine, _ = early_span_of_a_batch_job(store)
    store.write_process_bindings([ProcessBindingRow("host-a", 5000, *WORKLOAD, T0 + 200 * S)])
    store.write_spans([SpanRow("other", "s", "host-a", T0 + 5 * S, T0 + 6 * S, pid=5000)])
    engine.run_pass()
    store.write_process_bindings([ProcessBindingRow("host-a", 4242, *WORKLOAD, T0 + 10 * S)])  # stored late
    store.write_spans([SpanRow("late", "s", "host-a", T0 + 12 * S, T0 + 14 * S, pid=4242)])
    engine.run_pass()
    assert result(store, "late").active_j == pytest.approx(150.0, rel=1e-9)  # vllm alone, 2 s x 75 W


def test_the_engine_forgets_bindings_the_store_pruned(store: Store) -> None:
    """A long-running engine: pid 4242 changes workload every minute for four hours; pruning keeps the last hour's
    (and each pid's newest); the engine's memory of binding rows must not keep every one it ever read."""
    clock = Clock(T0)
    engine = engine_for(store, clock, finalize_grace_s=10)
    for minute in range(240):
        now = T0 + minute * 60 * S
        workload = WORKLOAD if minute % 2 else BATCH_JOB
        store.write_process_bindings([ProcessBindingRow("host-a", 4242, *workload, now)])
        store.write_spans([SpanRow(f"r{minute}", "s", "host-a", now, now + S, pid=4242)])
        clock.now_ns = now + 30 * S
        engine.run_pass()
        store.prune(now, raw_retention_s=3600, rollup_retention_s=86_400)
    stored = len(store.process_bindings("host-a"))
    assert stored <= 61
    remembered = sum(len(rows) for rows in engine._binding_rows.values())  # type: ignore[attr-defined]
    assert remembered <= stored + 10, (remembered, stored)
