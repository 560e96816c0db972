"""Review: pruning request spans and results, and schema steps 5 and 6 (spans into chunks), on both backends."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest

from collector.store import Store, StoreError, open_store
from collector.store import span_chunks as chunks_module
from collector.store.base import ProcessBindingRow, ResultColumns, SpanColumns, SpanRow
from collector.store.migrations import MIGRATIONS
from collector.store.spans import spans_to_chunks
from tests.store.builders import T0_NS
from tests.store.old_schema import at_version, insert_v4_span, migrated, run

S = 1_000_000_000
HOUR = 3600 * S


def span(request_id: str, span_id: str = "s1", host: str = "host-1", start_s: float = 0, end_s: float = 1) -> SpanRow:
    return SpanRow(
        request_id, span_id, host, T0_NS + round(start_s * S), T0_NS + round(end_s * S), model="llama",
        input_tokens=100, output_tokens=10,
    )  # fmt: skip


def chunk_rows(store: Store) -> list[tuple[Any, ...]]:
    """(hostname, min_start_ns, min_end_ns, max_end_ns, span_count, writer, spans) of every chunk."""

    def work(cursor: Any) -> list[tuple[Any, ...]]:
        cursor.execute(
            "SELECT h.hostname, c.min_start_ns, c.min_end_ns, c.max_end_ns, c.span_count, c.writer, c.data "
            "FROM span_chunks c JOIN span_hosts h ON h.id = c.host_ref ORDER BY c.id"
        )
        return [
            (str(h), int(a), int(b), int(c), int(n), w, chunks_module.decode(data, str(h)).spans())
            for h, a, b, c, n, w, data in cursor.fetchall()
        ]

    return list(run(store, work))


def where_spans_are(store: Store) -> dict[str, tuple[Any, Any, Any]]:
    def work(cursor: Any) -> dict[str, tuple[Any, Any, Any]]:
        cursor.execute("SELECT request_id, span_hosts, span_start_ns, span_end_ns FROM requests")
        return {
            str(rid): (None if hosts is None else json.loads(hosts), start, end)
            for rid, hosts, start, end in cursor.fetchall()
        }

    return dict(run(store, work))


def engine_result(request_id: str, status: str, count: int, active_j: float | None, hosts: str) -> ResultColumns:
    return ResultColumns(
        request_id=[request_id], status=[status], model=["llama"], tenant=[""], hosts=[hosts], start_ns=[T0_NS],
        end_ns=[T0_NS + S], input_tokens=[100], output_tokens=[10], active_j=[active_j], full_j=[active_j],
        gpu_j=[active_j], cpu_j=[None if active_j is None else 0.0], dram_j=[None if active_j is None else 0.0],
        span_count=[count], updated_ns=[T0_NS],
    )  # fmt: skip


# -- prune


def test_prune_in_the_middle_of_a_chunk_keeps_the_newer_spans_and_fixes_the_bounds(store: Store) -> None:
    rows = [
        span("a", start_s=0, end_s=100),
        span("b", start_s=50, end_s=200),
        span("c", start_s=150, end_s=3000),  # starts before the cutoff, ends after it: kept
        span("d", start_s=2900, end_s=4000),
        span("e", start_s=2500, end_s=2800),
    ]
    store.write_spans(rows)  # one chunk
    cutoff = T0_NS + 1000 * S
    assert store.prune(cutoff + HOUR, raw_retention_s=3600, rollup_retention_s=86_400) == 2
    [(_, min_start, min_end, max_end, count, writer, kept)] = chunk_rows(store)
    assert sorted(s.request_id for s in kept) == ["c", "d", "e"]
    assert (min_start, min_end, max_end, count) == (T0_NS + 150 * S, T0_NS + 2800 * S, T0_NS + 4000 * S, 3)
    assert writer is not None
    assert [s.request_id for s in store.spans_overlapping("host-1", T0_NS, T0_NS + 5000 * S)] == ["e", "c", "d"]
    assert store.latest_span_ends() == {"host-1": T0_NS + 4000 * S}
    # a second prune at the same cutoff changes nothing
    assert store.prune(cutoff + HOUR, raw_retention_s=3600, rollup_retention_s=86_400) == 0


def test_a_pending_request_whose_spans_are_pruned_is_no_samples_and_never_pending_again(store: Store) -> None:
    store.write_spans([span("p", start_s=0, end_s=10), span("p", "s2", host="host-2", start_s=5, end_s=20)])
    store.write_spans([span("fresh", start_s=7000, end_s=7100)])
    store.prune(T0_NS + 2 * HOUR, raw_retention_s=3600, rollup_retention_s=86_400)
    settled = store.request("p")
    assert settled is not None and settled.status == "no_samples" and settled.active_j is None
    assert store.pending_requests(100) == ["fresh"]
    # a late span of it (a replay hours late) makes it pending; the next prune settles it again
    store.write_spans([span("p", "s3", start_s=6, end_s=30)])
    assert "p" in store.pending_requests(100)
    store.prune(T0_NS + 2 * HOUR + S, raw_retention_s=3600, rollup_retention_s=86_400)
    assert store.pending_requests(100) == ["fresh"]
    again = store.request("p")
    assert again is not None and again.status == "no_samples"


def test_a_final_request_outlives_its_spans_and_samples(store: Store) -> None:
    store.write_spans([span("f", start_s=0, end_s=10)])
    store.write_request_results([
        dataclasses.replace(
            store.request("f"), status="final", active_j=5.0, full_j=6.0, gpu_j=5.0, cpu_j=0.0, dram_j=0.0
        )  # type: ignore[type-var]
    ])  # fmt: skip
    before = store.request("f")
    store.prune(T0_NS + 2 * HOUR, raw_retention_s=3600, rollup_retention_s=86_400)
    assert store.request_spans(["f"]) == []
    assert store.request("f") == before
    assert [r.request_id for r in store.requests(None, T0_NS - S, T0_NS + S, 10, "start")] == ["f"]
    summary = store.request_summary("model", T0_NS - S, T0_NS + S)
    assert [(row.group, row.count, row.energy_j) for row in summary] == [("llama", 1, 5.0)]


def test_the_engine_s_result_from_spans_in_memory_after_their_prune(store: Store) -> None:
    """The engine held the spans (in memory) and computed a result; the prune ran in between."""
    store.write_spans([span("m", start_s=0, end_s=10)])
    store.prune(T0_NS + 2 * HOUR, raw_retention_s=3600, rollup_retention_s=86_400)
    assert store.request_spans(["m"]) == []
    assert store.write_result_columns(engine_result("m", "final", 1, 3.0, '["host-1"]')) == []
    written = store.request("m")
    assert written is not None and (written.status, written.active_j, written.spans) == ("final", 3.0, 1)
    assert store.pending_requests(10) == []


# -- schema steps 5 and 6


HOSTS = [f"host-{i:02d}" for i in range(7)]


def _many_spans() -> tuple[list[SpanRow], dict[str, str]]:
    """Spans of 120 requests over 7 hosts (some on several), ends with many ties; request -> status."""
    rng = random.Random(5)
    spans: list[SpanRow] = []
    statuses: dict[str, str] = {}
    for r in range(120):
        rid = f"req-{r:03d}"
        statuses[rid] = rng.choice(["final", "pending", "approximate", "no_samples"])
        for k in range(rng.randint(1, 4)):
            start = rng.randint(0, 50)
            end = start + rng.choice([0, 1, 2, 5, 5, 5, 10])
            if rng.random() < 0.05:
                start, end = end, start - 1  # ends before it starts
            row = span(rid, f"s{k}", host=rng.choice(HOSTS), start_s=start, end_s=end)
            spans.append(dataclasses.replace(row, labels={"k": str(k)}, received_ns=T0_NS + rng.randint(0, 99)))
    return spans, statuses


def _version_4_with_many_spans(store_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[SpanRow], dict[str, str]]:
    """A version 4 database holding ``_many_spans()`` (returned), migrated later 7 spans a page."""
    monkeypatch.setattr("collector.store.spans.MIGRATION_PAGE", 7)
    spans, statuses = _many_spans()

    def fill(cursor: Any) -> None:
        for name in HOSTS:
            cursor.execute("INSERT INTO span_hosts (hostname) VALUES (?)", (name,))
        for row in spans:
            insert_v4_span(cursor, row, HOSTS.index(row.hostname) + 1)
        for rid, status in statuses.items():
            mine = [s for s in spans if s.request_id == rid]
            cursor.execute(
                "INSERT INTO requests (request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, "
                "output_tokens, active_j, span_count, updated_ns) VALUES (?, ?, 'llama', '', ?, ?, ?, 1, 1, ?, ?, 0)",
                (rid, status, json.dumps([mine[0].hostname]), min(s.start_ns for s in mine),
                 max(s.end_ns for s in mine), None if status in ("pending", "no_samples") else 1.5, len(mine)),
            )  # fmt: skip

    at_version(store_url, monkeypatch, 4, fill)
    return spans, statuses


def _check_migrated(store: Store, spans: list[SpanRow], statuses: dict[str, str]) -> None:
    rows = chunk_rows(store)
    stored = [s for row in rows for s in row[6]]
    assert sorted(stored, key=lambda s: (s.request_id, s.span_id)) == sorted(
        spans, key=lambda s: (s.request_id, s.span_id)
    )  # every span, exactly once
    for host, min_start, min_end, max_end, count, writer, inside in rows:
        assert writer is None
        assert count == len(inside) and all(s.hostname == host for s in inside)
        assert min_start == min(min(s.start_ns, s.end_ns) for s in inside)
        assert min_end == min(s.end_ns for s in inside)
        assert max_end == max(max(s.start_ns, s.end_ns) for s in inside)
    where = where_spans_are(store)
    for rid, status in statuses.items():
        mine = [s for s in spans if s.request_id == rid]
        assert where[rid] == (
            sorted({s.hostname for s in mine}),
            min(min(s.start_ns, s.end_ns) for s in mine),
            max(max(s.start_ns, s.end_ns) for s in mine),
        ), rid
        got = store.request(rid)
        assert got is not None and got.status == status and got.spans == len(mine)
        if status == "pending":
            assert list(got.hosts) == sorted({s.hostname for s in mine})
        else:
            assert list(got.hosts) == [mine[0].hostname]
    by_key = sorted(spans, key=lambda s: (s.request_id, s.span_id))
    assert store.request_spans(list(statuses)) == by_key
    # a replay of all of them is stored once: nothing new
    assert store.write_spans(spans) == 0


def test_version_4_with_many_spans_of_many_hosts_moves_into_chunks_exactly(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans, statuses = _version_4_with_many_spans(store_url, monkeypatch)
    with migrated(store_url) as new:
        _check_migrated(new, spans, statuses)


def test_a_migration_that_fails_in_its_conversion_leaves_version_4_usable_and_a_rerun_completes(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans, statuses = _version_4_with_many_spans(store_url, monkeypatch)

    def convert_then_fail(cursor: Any, dialect: Any) -> None:
        spans_to_chunks(cursor, dialect)  # all the way, the spans table dropped
        raise RuntimeError("power cut")

    broken = tuple(dataclasses.replace(m, convert=convert_then_fail) if m.version == 5 else m for m in MIGRATIONS)
    with monkeypatch.context() as failing:
        failing.setattr("collector.store.sql.MIGRATIONS", broken)
        store = open_store(store_url)
        try:
            with pytest.raises(RuntimeError, match="power cut"):
                store.migrate()
            assert store.schema_version() == 4

            def old_tables(cursor: Any) -> tuple[int, int]:
                cursor.execute("SELECT COUNT(*) FROM spans")
                n = int(cursor.fetchone()[0])
                cursor.execute("SELECT COUNT(*) FROM requests")
                return n, int(cursor.fetchone()[0])

            assert run(store, old_tables) == (len(spans), len(statuses))
            with pytest.raises(StoreError):  # no step-5 table is left behind
                run(store, lambda cursor: cursor.execute("SELECT COUNT(*) FROM span_chunks"))
        finally:
            store.close()
    with migrated(store_url) as again:
        _check_migrated(again, spans, statuses)


def test_a_version_4_span_with_nul_in_its_names_survives_the_move_into_chunks(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the store replaced NUL (schema 2 and 3 on SQLite), a span's names could hold it; PostgreSQL refused
    it, so there the row is written as the store writes it now."""
    sqlite = store_url.startswith("sqlite")
    nul = "\0" if sqlite else "\ufffd"
    odd = dataclasses.replace(span("r1", start_s=0, end_s=1), workload=f"serve{nul}llm")
    plain = [span(f"r{i}", start_s=i, end_s=i + 1) for i in range(2, 6)]

    def fill(cursor: Any) -> None:
        cursor.execute("INSERT INTO span_hosts (hostname) VALUES ('host-1')")
        for row in [odd, *plain]:
            insert_v4_span(cursor, row, 1)
            cursor.execute(
                "INSERT INTO requests (request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, "
                "output_tokens, span_count, updated_ns) VALUES (?, 'pending', 'llama', '', '[\"host-1\"]', ?, ?, "
                "100, 10, 1, 0)",
                (row.request_id, row.start_ns, row.end_ns),
            )

    at_version(store_url, monkeypatch, 4, fill)
    with migrated(store_url) as new:
        found = new.request_spans([f"r{i}" for i in range(1, 6)])
        assert [s.request_id for s in found] == [f"r{i}" for i in range(1, 6)]  # none lost with the odd one
        assert found[0].workload == "serve\ufffdllm"


def test_chunk_encoding_of_text_with_nul_reads_back() -> None:
    columns = SpanColumns.of([dataclasses.replace(span("r"), workload="a\0b")])
    decoded = chunks_module.decode(chunks_module.encode(columns), "host-1")
    assert decoded.workload == ["a\ufffdb"] and decoded.request_id == ["r"]


def test_version_6_bindings_move_to_one_row_per_sighting(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema step 7: the bindings of a version 6 database are kept, and from then on each sighting is its own."""

    def fill(cursor: Any) -> None:  # as version 6 wrote them: the newest sighting of each
        cursor.execute("INSERT INTO span_hosts (hostname) VALUES ('host-1')")
        cursor.execute(
            "INSERT INTO process_bindings (host_ref, pid, workload, phase, job, seen_ns) "
            "SELECT id, 7, 'serve', 'inference', '', ? FROM span_hosts",
            (T0_NS + 5,),
        )

    at_version(store_url, monkeypatch, 6, fill)
    with migrated(store_url) as new:
        assert [b.seen_ns for b in new.process_bindings("host-1")] == [T0_NS + 5]  # version 6 kept the newest
        new.write_process_bindings([ProcessBindingRow("host-1", 7, "train", "training", "", T0_NS + 9)])
        new.write_process_bindings([ProcessBindingRow("host-1", 7, "serve", "inference", "", T0_NS + 20)])
        assert [(b.workload, b.seen_ns) for b in new.process_bindings("host-1")] == [
            ("serve", T0_NS + 5), ("train", T0_NS + 9), ("serve", T0_NS + 20)
        ]  # fmt: skip
