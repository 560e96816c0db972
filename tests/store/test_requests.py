"""Request spans, process bindings and per-request results, on SQLite and on a real PostgreSQL server (the ``store``
fixture is parametrized)."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench import store_requests as bench_store_requests
from collector.aggregator.spans import MAX_TEXT
from collector.store import Store, StoreError, open_store
from collector.store.base import (
    ProcessBindingRow,
    RequestResult,
    RequestSummaryRow,
    ResultColumns,
    SpanColumns,
    SpanRow,
)
from tests.fakes.threads import run_in_threads
from tests.store.builders import T0_NS, batch
from tests.store.old_schema import at_version, insert_v4_span, migrated

S = 1_000_000_000
HOUR = 3600 * S


def span(
    request_id: str,
    span_id: str = "s1",
    host: str = "host-1",
    start_s: float = 0.0,
    end_s: float = 1.0,
    **fields: object,
) -> SpanRow:
    """A span from T0 + start_s to T0 + end_s."""
    values: dict[str, object] = {"model": "llama", "input_tokens": 100, "output_tokens": 10, **fields}
    return SpanRow(request_id, span_id, host, T0_NS + round(start_s * S), T0_NS + round(end_s * S), **values)  # type: ignore[arg-type]


def result(request_id: str, active_j: float | None = 10.0, **fields: object) -> RequestResult:
    values: dict[str, object] = {
        "status": "final",
        "model": "llama",
        "hosts": ("host-1",),
        "start_ns": T0_NS,
        "end_ns": T0_NS + S,
        "output_tokens": 10,
        "spans": 1,
        **fields,
    }
    if active_j is not None:
        values.update(active_j=active_j, full_j=active_j * 1.5, gpu_j=active_j * 0.8, cpu_j=active_j * 0.15)
        values["dram_j"] = active_j - values["gpu_j"] - values["cpu_j"]  # type: ignore[operator]
    return RequestResult(request_id, **values)  # type: ignore[arg-type]


def keys(spans: list[SpanRow]) -> list[tuple[str, str]]:
    return [(s.request_id, s.span_id) for s in spans]


# -- spans


def test_spans_read_back_exactly_and_a_span_sent_twice_is_stored_once(store: Store) -> None:
    full = span(
        "req-a",
        "span-1",
        start_s=1.0,
        end_s=3.5,
        workload="serve-llm",
        pid=4242,
        service_name="vllm",
        tenant="acme",
        input_tokens=512,
        output_tokens=128,
        queue_end_ns=T0_NS + int(1.2 * S),
        prefill_end_ns=T0_NS + int(1.5 * S),
        labels={"region": "eu", "priority": "high"},
        received_ns=T0_NS + 4 * S,
    )
    other = span("req-b")
    assert store.write_spans([full, other]) == 2
    assert store.request_spans(["req-a", "req-b", "req-unknown"]) == [full, other]
    # the same span again, alone or beside a changed copy of itself: nothing new, the first one stays
    changed = dataclasses.replace(full, output_tokens=999, labels={})
    assert store.write_spans([full]) == 0
    assert store.write_spans([changed, full]) == 0
    assert store.request_spans(["req-a"]) == [full]
    # one key twice in one call: the first is kept
    assert store.write_spans([span("req-c", output_tokens=1), span("req-c", output_tokens=2)]) == 1
    assert [s.output_tokens for s in store.request_spans(["req-c"])] == [1]
    pending = store.request("req-a")
    assert pending is not None
    assert (pending.status, pending.spans, pending.input_tokens, pending.output_tokens) == ("pending", 1, 512, 128)
    assert (pending.start_ns, pending.end_ns, pending.model, pending.tenant) == (
        full.start_ns,
        full.end_ns,
        "llama",
        "acme",
    )
    assert pending.active_j is None and pending.joules_per_output_token is None
    assert store.request("req-unknown") is None
    assert store.write_spans([]) == 0
    assert store.request_spans([]) == []


def test_a_new_span_makes_a_computed_request_pending_again_and_stale_results_are_not_written(store: Store) -> None:
    store.write_spans([span("req-a", host="host-1", start_s=0, end_s=2, input_tokens=10, output_tokens=20)])
    assert store.write_request_results([result("req-a", active_j=5.0, input_tokens=10, output_tokens=20)]) == 1
    final = store.request("req-a")
    assert final is not None
    assert (final.status, final.active_j, final.gpu_j, final.joules_per_output_token) == ("final", 5.0, 4.0, 0.25)
    # a duplicate changes nothing, alone or beside a new span
    assert store.write_spans([span("req-a", host="host-1", start_s=0, end_s=2)]) == 0
    assert store.write_spans([span("req-0"), span("req-a", host="host-1", start_s=0, end_s=2)]) == 1
    assert store.request("req-a") == final
    assert store.pending_requests(10) == ["req-0"]
    store.write_request_results([result("req-0")])
    # a second span, on another host, earlier and later: pending again, what it had computed dropped
    later = span("req-a", "s2", host="host-2", start_s=-1, end_s=3, tenant="acme", input_tokens=1, output_tokens=2)
    assert store.write_spans([later]) == 1
    again = store.request("req-a")
    assert again is not None
    assert again.status == "pending"
    assert (again.active_j, again.full_j, again.gpu_j, again.cpu_j, again.dram_j) == (None,) * 5
    assert again.hosts == ("host-1", "host-2")
    assert (again.start_ns, again.end_ns) == (T0_NS - S, T0_NS + 3 * S)
    assert (again.input_tokens, again.output_tokens, again.spans) == (11, 22, 2)
    assert (again.model, again.tenant) == ("llama", "acme")
    assert store.pending_requests(10) == ["req-a"]
    # the engine's result from the one span it had read is stale: not written, still pending
    assert store.write_request_results([result("req-a", spans=1)]) == 0
    assert store.request("req-a") == again
    two = result("req-a", active_j=7.0, spans=2, hosts=("host-1", "host-2"), output_tokens=22, updated_ns=T0_NS + 9)
    assert store.write_request_results([two]) == 1
    assert store.request("req-a") == two
    assert store.pending_requests(10) == []


def test_results_are_upserted_and_their_status_checked(store: Store) -> None:
    store.write_spans([span("req-a"), span("req-b")])
    no_samples = result("req-b", active_j=None, status="no_samples")
    assert store.write_request_results([result("req-a", active_j=1.0), no_samples, result("req-a", active_j=2.0)]) == 2
    a, b = store.request("req-a"), store.request("req-b")
    assert a is not None and a.active_j == 2.0  # of one id given twice, the last
    assert b == no_samples and b.joules_per_output_token is None
    # a result for a request whose spans it has not seen yet (another aggregator stored them) is kept too
    assert store.write_request_results([result("req-elsewhere", active_j=3.0)]) == 1
    bad = dataclasses.replace(result("req-a"), status="done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status 'done'"):
        store.write_request_results([bad])
    assert store.write_request_results([]) == 0


def columns_of(results: list[RequestResult]) -> ResultColumns:
    rows = [
        (r.request_id, r.status, r.model, r.tenant, json.dumps(list(r.hosts)), r.start_ns, r.end_ns, r.input_tokens,
         r.output_tokens, r.active_j, r.full_j, r.gpu_j, r.cpu_j, r.dram_j, r.spans, r.updated_ns)
        for r in results
    ]  # fmt: skip
    return ResultColumns(*(list(column) for column in zip(*rows, strict=True)))


def test_the_engines_results_update_status_hosts_and_energies_and_stale_ones_stay_pending(store: Store) -> None:
    many = [span(f"req-{i:04d}", input_tokens=1, output_tokens=2) for i in range(1_200)]  # several statements
    store.write_spans([*many, span("req-a", host="host-1"), span("req-b", start_s=3, end_s=4)])
    everything = [(s.request_id, 1) for s in many] + [("req-a", 1), ("req-b", 1)]
    assert sorted(store.pending_request_counts(2_000)) == sorted(everything)
    # the engine's model, times and tokens are what the spans say; a stored request keeps the stored ones
    done = [result(s.request_id, 2.0, input_tokens=1, output_tokens=2, model="other", updated_ns=7) for s in many]
    assert store.write_result_columns(columns_of(done)) == []
    got = store.request("req-0042")
    assert got == result("req-0042", 2.0, input_tokens=1, output_tokens=2, updated_ns=7)
    store.write_spans([span("req-a", "s2", host="host-2", start_s=2, end_s=5)])  # after the engine read req-a
    stale = result("req-a", 4.0, hosts=("host-1",), updated_ns=8)  # computed from its first span only
    fresh = result("req-b", 1.0, start_ns=T0_NS + 3 * S, end_ns=T0_NS + 4 * S, input_tokens=100, updated_ns=8)
    elsewhere = result("req-unknown", 3.0, tenant="t", updated_ns=8)  # not stored (pruned): the whole row
    assert store.write_result_columns(columns_of([stale, fresh, elsewhere])) == ["req-a"]
    assert store.request("req-a") == RequestResult(
        "req-a", "pending", "llama", "", ("host-1", "host-2"), T0_NS, T0_NS + 5 * S, 200, 20, spans=2,
        updated_ns=store.request("req-a").updated_ns,  # type: ignore[union-attr]
    )  # fmt: skip
    assert store.request("req-b") == fresh
    assert store.request("req-unknown") == elsewhere
    assert store.pending_request_counts(10) == [("req-a", 2)]
    both = result("req-a", 5.0, hosts=("host-1", "host-2"), end_ns=T0_NS + 5 * S, spans=2, updated_ns=9)
    assert store.write_result_columns(columns_of([both])) == []
    assert store.request("req-a") == dataclasses.replace(both, input_tokens=200, output_tokens=20)
    assert store.pending_request_counts(10) == []


def test_pending_requests_oldest_end_first(store: Store) -> None:
    store.write_spans([span("r1", end_s=3), span("r2", end_s=1), span("r3", end_s=2), span("r4", end_s=0.5)])
    store.write_request_results([result("r4")])
    assert store.pending_requests(10) == ["r2", "r3", "r1"]
    assert store.pending_requests(2) == ["r2", "r3"]


def test_spans_and_bindings_commit_with_their_batch_and_not_with_a_duplicate(store: Store) -> None:
    binding = ProcessBindingRow("host-1", 4242, "serve-llm", "inference", "job-2", T0_NS)
    first = dataclasses.replace(batch(1), spans=(span("req-x"),), bindings=(binding,))
    assert store.write_batch(first).stored
    assert keys(store.request_spans(["req-x"])) == [("req-x", "s1")]
    assert store.pending_requests(10) == ["req-x"]
    assert store.process_bindings("host-1") == [binding]
    # a replay of batch 1 carrying other spans and bindings: none of them stored
    other = ProcessBindingRow("host-1", 7, "train", "training", "", T0_NS + S)
    replay = dataclasses.replace(batch(1), spans=(span("req-y"),), bindings=(other,))
    assert store.write_batch(replay).stored is False
    assert store.request("req-y") is None
    assert store.process_bindings("host-1") == [binding]
    # one group: batch 2 stored with its spans, the same sequence again in the group not
    twice = [
        dataclasses.replace(batch(2), spans=(span("req-z"),)),
        dataclasses.replace(batch(2), spans=(span("req-w"),)),
        dataclasses.replace(batch(3), spans=(span("req-z", "s2", host="host-2"),)),
    ]
    assert [r.stored for r in store.write_batches(twice)] == [True, False, True]
    assert keys(store.request_spans(["req-z", "req-w"])) == [("req-z", "s1"), ("req-z", "s2")]
    z = store.request("req-z")
    assert z is not None and z.hosts == ("host-1", "host-2") and z.spans == 2


def test_spans_overlapping_includes_touching_spans_of_that_host_only(store: Store) -> None:
    a = span("a", start_s=10, end_s=20)
    b = span("b", host="host-2", start_s=10, end_s=20)
    c = span("c", start_s=30, end_s=40)
    store.write_spans([a, b, c])
    store.write_request_results([result("c")])  # whatever their status

    def overlapping(host: str, since_s: float, until_s: float) -> list[str]:
        return [s.request_id for s in store.spans_overlapping(host, T0_NS + int(since_s * S), T0_NS + int(until_s * S))]

    assert overlapping("host-1", 20, 25) == ["a"]  # ends where the window starts
    assert overlapping("host-1", 0, 10) == ["a"]  # starts where the window ends
    assert overlapping("host-1", 0, 9.999) == []
    assert store.spans_overlapping("host-1", a.end_ns + 1, c.start_ns - 1) == []
    assert overlapping("host-1", 15, 35) == ["a", "c"]  # by end
    assert overlapping("host-1", 0, 100) == ["a", "c"]
    assert overlapping("host-1", 12, 13) == ["a"]  # inside the span
    assert overlapping("host-2", 0, 100) == ["b"]
    assert overlapping("host-3", 0, 100) == []


# -- reads for the API


def test_summary_per_model_tenant_and_host_with_percentiles(store: Store) -> None:
    def at(i: int, request_id: str, active_j: float | None, **fields: object) -> RequestResult:
        return result(request_id, active_j=active_j, start_ns=T0_NS + i * S, end_ns=T0_NS + i * S + S, **fields)

    store.write_request_results(
        [
            at(0, "l1", 10.0, tenant="acme"),
            at(1, "l2", 20.0, tenant="acme"),
            at(2, "l3", 30.0, tenant="acme"),
            at(3, "l4", 40.0),
            at(4, "l5", 100.0, hosts=("host-1", "host-2")),
            at(5, "m1", 1.0, model="mistral", tenant="beta", output_tokens=0, hosts=("host-2",), status="approximate"),
            at(6, "m2", 3.0, model="mistral", tenant="beta", output_tokens=0, hosts=("host-2",)),
            # not counted: no energy, or outside [since, until)
            at(7, "n1", None, status="no_samples"),
            at(100, "late", 1000.0),
            at(-1, "early", 1000.0),
        ]
    )
    store.write_spans([span("pending", start_s=8)])  # pending: not counted
    since, until = T0_NS, T0_NS + 100 * S
    assert store.request_summary("model", since, until) == [
        # llama: 10 20 30 40 100; p95 at rank 0.95 x 4 = 3.8: 40 + 0.8 x 60
        RequestSummaryRow("llama", 5, 200.0, 30.0, pytest.approx(88.0), 50, 4.0),  # type: ignore[arg-type]
        # mistral: 1 3; p95 at rank 0.95: 1 + 0.95 x 2; no output tokens: no J per token
        RequestSummaryRow("mistral", 2, 4.0, 2.0, pytest.approx(2.9), 0, None),  # type: ignore[arg-type]
    ]
    assert store.request_summary("tenant", since, until) == [
        # "": 40 100, p95 = 40 + 0.95 x 60
        RequestSummaryRow("", 2, 140.0, 70.0, pytest.approx(97.0), 20, 7.0),  # type: ignore[arg-type]
        # acme: 10 20 30, p95 at rank 1.9: 20 + 0.9 x 10
        RequestSummaryRow("acme", 3, 60.0, 20.0, pytest.approx(29.0), 30, 2.0),  # type: ignore[arg-type]
        RequestSummaryRow("beta", 2, 4.0, 2.0, pytest.approx(2.9), 0, None),  # type: ignore[arg-type]
    ]
    # l5 ran on both hosts: it counts in each
    assert store.request_summary("host", since, until) == [
        RequestSummaryRow("host-1", 5, 200.0, 30.0, pytest.approx(88.0), 50, 4.0),  # type: ignore[arg-type]
        # 1 3 100: p50 3, p95 at rank 1.9: 3 + 0.9 x 97
        RequestSummaryRow("host-2", 3, 104.0, 3.0, pytest.approx(90.3), 10, 10.4),  # type: ignore[arg-type]
    ]
    assert store.request_summary("model", T0_NS + 200 * S, T0_NS + 300 * S) == []
    with pytest.raises(ValueError, match="by='job'"):
        store.request_summary("job", since, until)  # type: ignore[arg-type]


def test_requests_by_window_model_and_order(store: Store) -> None:
    store.write_request_results(
        [
            result("a", 5.0, start_ns=T0_NS, model="llama"),
            result("b", 50.0, start_ns=T0_NS + S, model="mistral"),
            result("c", 20.0, start_ns=T0_NS + 2 * S, model="llama"),
        ]
    )
    store.write_spans([span("d", start_s=3, model="llama")])  # pending: no energy yet

    def ids(**query: object) -> list[str]:
        return [r.request_id for r in store.requests(**query)]  # type: ignore[arg-type]

    assert ids() == ["d", "c", "b", "a"]
    assert ids(model="llama") == ["d", "c", "a"]
    assert ids(model="gpt") == []
    assert ids(since_ns=T0_NS + S) == ["d", "c", "b"]
    assert ids(since_ns=T0_NS + S, until_ns=T0_NS + 3 * S) == ["c", "b"]  # until is open
    assert ids(until_ns=T0_NS + S) == ["a"]
    assert ids(limit=2) == ["d", "c"]
    assert ids(order="energy") == ["b", "c", "a", "d"]  # those without energy last
    assert ids(order="energy", model="llama", limit=1) == ["c"]
    assert store.requests(model="llama", limit=1)[0].status == "pending"


def test_process_bindings_keep_each_sighting_once(store: Store) -> None:
    """A row per sighting (a pid bound again later, an agent sending its bindings again after a restart), each once
    however often it is written."""
    serve = ("serve-llm", "inference", "job-2")
    store.write_process_bindings(
        [
            ProcessBindingRow("host-1", 10, *serve, T0_NS),
            ProcessBindingRow("host-1", 10, *serve, T0_NS),  # one row named twice in one call
            ProcessBindingRow("host-1", 10, *serve, T0_NS + 5 * S),
            ProcessBindingRow("host-1", 11, "train", "training", "", T0_NS + S),
            ProcessBindingRow("host-2", 10, "other", "inference", "", T0_NS),
        ]
    )
    store.write_process_bindings([ProcessBindingRow("host-1", 10, *serve, T0_NS + 5 * S)])  # again: once
    store.write_process_bindings([])
    assert store.process_bindings("host-1") == [
        ProcessBindingRow("host-1", 10, *serve, T0_NS),
        ProcessBindingRow("host-1", 11, "train", "training", "", T0_NS + S),
        ProcessBindingRow("host-1", 10, *serve, T0_NS + 5 * S),
    ]
    assert store.process_bindings("host-1", since_ns=T0_NS + 2 * S) == [
        ProcessBindingRow("host-1", 10, *serve, T0_NS + 5 * S)
    ]
    assert [b.workload for b in store.process_bindings("host-2")] == ["other"]
    assert store.process_bindings("host-3") == []


def test_spans_written_elsewhere_are_those_another_open_store_wrote(store: Store, store_url: str) -> None:
    store.write_spans([span("mine", start_s=2, end_s=4)])
    assert not store.spans_written_elsewhere("host-1", T0_NS, T0_NS + 10 * S)
    other = open_store(store_url)  # another aggregator sharing the database
    try:
        other.write_spans([span("theirs", start_s=6, end_s=8), span("there", host="host-2", start_s=6, end_s=8)])
    finally:
        other.close()
    assert store.spans_written_elsewhere("host-1", T0_NS + 5 * S, T0_NS + 7 * S)
    assert store.spans_written_elsewhere("host-1", T0_NS + 8 * S, T0_NS + 9 * S)  # the bounds touch
    assert not store.spans_written_elsewhere("host-1", T0_NS, T0_NS + 5 * S)  # before theirs: mine alone
    assert not store.spans_written_elsewhere("host-1", T0_NS + 8 * S + 1, T0_NS + 20 * S)  # after theirs
    assert not store.spans_written_elsewhere("host-3", T0_NS, T0_NS + 20 * S)  # no spans there
    reopened = open_store(store_url)  # this aggregator after a restart: what it wrote before is another's now
    try:
        assert reopened.spans_written_elsewhere("host-1", T0_NS, T0_NS + 5 * S)
        reopened.write_spans([span("new", start_s=30, end_s=31)])
        assert not reopened.spans_written_elsewhere("host-1", T0_NS + 30 * S, T0_NS + 31 * S)
    finally:
        reopened.close()


# -- schema step 5: spans as chunks


def test_a_version_4_database_s_spans_move_into_chunks(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans stored a row each (schema 4) read back exactly after the step to chunks, paged with ties at the page
    edge; a pending request gets the hosts of all its spans; a span sent again is still stored once."""
    monkeypatch.setattr("collector.store.spans.MIGRATION_PAGE", 3)
    # five spans on host-1, three of them ending at the same time (the page edge falls among them)
    on_one = [span(f"r{i}", start_s=i, end_s=[1, 2, 5, 5, 5][i], labels={"i": str(i)}) for i in range(5)]
    multi = [span("multi", "a", host="host-1", end_s=9), span("multi", "b", host="host-2", start_s=8, end_s=9.5)]

    def fill(cursor: Any) -> None:
        for name in ("host-1", "host-2"):
            cursor.execute("INSERT INTO span_hosts (hostname) VALUES (?)", (name,))
        for row in [*on_one, *multi]:
            insert_v4_span(cursor, row, 1 if row.hostname == "host-1" else 2)
        for rid, status, hosts, start, end, count in [
            *((f"r{i}", "final", '["host-1"]', on_one[i].start_ns, on_one[i].end_ns, 1) for i in range(5)),
            ("multi", "pending", '["host-1"]', multi[0].start_ns, multi[1].end_ns, 2),  # the first span's host
        ]:
            cursor.execute(
                "INSERT INTO requests (request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, "
                "output_tokens, span_count, updated_ns) VALUES (?, ?, 'llama', '', ?, ?, ?, 100, 10, ?, 0)",
                (rid, status, hosts, start, end, count),
            )

    at_version(store_url, monkeypatch, 4, fill)
    with migrated(store_url) as new:
        assert new.request_spans([f"r{i}" for i in range(5)] + ["multi"]) == sorted(
            [*on_one, *multi], key=lambda row: (row.request_id, row.span_id)
        )
        assert keys(new.spans_overlapping("host-1", T0_NS + 4 * S, T0_NS + 10 * S)) == [
            ("r2", "s1"), ("r3", "s1"), ("r4", "s1"), ("multi", "a"),
        ]  # fmt: skip
        pending = new.request("multi")
        assert pending is not None and pending.hosts == ("host-1", "host-2")
        assert new.write_spans([multi[1], on_one[3]]) == 0
        assert new.latest_span_ends() == {"host-1": multi[0].end_ns, "host-2": multi[1].end_ns}
        # moved before chunks had a writer (schema step 6): no engine holds them in memory
        assert new.spans_written_elsewhere("host-2", T0_NS, T0_NS + 10 * S)
        with pytest.raises(StoreError):  # the old table is gone
            new._run(lambda cursor: cursor.execute("SELECT COUNT(*) FROM spans"), write=False)  # type: ignore[attr-defined]


def test_a_late_span_on_another_host_joins_its_request_and_a_repeat_of_it_does_not(store: Store) -> None:
    assert store.write_spans([span("r", "a", host="host-1", end_s=2)]) == 1
    store.write_request_results([result("r", 4.0, input_tokens=100, end_ns=T0_NS + 2 * S)])
    late = span("r", "b", host="host-2", start_s=1, end_s=3, input_tokens=5, output_tokens=6)
    assert store.write_spans([late, span("other", host="host-2")]) == 2
    again = store.request("r")
    assert again is not None
    assert (again.status, again.hosts, again.spans, again.active_j) == ("pending", ("host-1", "host-2"), 2, None)
    assert (again.input_tokens, again.output_tokens, again.end_ns) == (105, 16, late.end_ns)
    assert store.write_spans([late]) == 0
    assert store.write_spans([span("r", "a", host="host-1", end_s=2)]) == 0
    assert keys(store.request_spans(["r"])) == [("r", "a"), ("r", "b")]
    assert store.request("r") == again


def test_a_result_written_whole_with_other_times_neither_hides_the_spans_nor_lets_a_repeat_in(store: Store) -> None:
    s = span("r", start_s=2, end_s=3)
    assert store.write_spans([s]) == 1
    # a whole result (write_request_results) whose window [T0, T0+1s] misses the span's [T0+2s, T0+3s]
    assert store.write_request_results([result("r")]) == 1
    assert keys(store.request_spans(["r"])) == [("r", "s1")]  # the span is where it was
    assert store.write_spans([s]) == 0


def test_a_repeat_after_a_result_written_whole_leaves_the_request_settled(store: Store) -> None:
    s = span("r", start_s=2, end_s=3)
    store.write_spans([s])
    store.write_request_results([result("r")])
    assert store.write_spans([s]) == 0  # a replay: counted, the row would say 2 spans and every result be stale
    assert len(store.request_spans(["r"])) == 1
    assert store.pending_request_counts(10) == []


def test_a_result_written_whole_with_other_hosts_does_not_hide_the_spans(store: Store) -> None:
    store.write_spans([span("r", host="host-1")])
    store.write_request_results([result("r", hosts=("host-9",))])
    assert keys(store.request_spans(["r"])) == [("r", "s1")]


def test_a_span_ending_before_it_starts_is_kept_and_found(store: Store) -> None:
    bad = span("r", start_s=3, end_s=2)  # the store takes it (only the gRPC ingest checks)
    assert store.write_spans([bad]) == 1
    assert store.request_spans(["r"]) == [bad]


def test_step_5_finds_the_spans_of_a_pending_request_whose_row_names_another_host(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v4: a result stored first (hosts [host-2]), then its span on host-1 made it pending; v4's upsert kept the
    row's hosts. After step 5 the spans are found where they are, and the pending request shows their host."""
    s = span("r", host="host-1")

    def fill(cursor: Any) -> None:
        cursor.execute("INSERT INTO span_hosts (hostname) VALUES ('host-1')")
        insert_v4_span(cursor, s, 1)
        cursor.execute(
            "INSERT INTO requests (request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, "
            "output_tokens, span_count, updated_ns) VALUES ('r', 'pending', 'llama', '', '[\"host-2\"]', ?, ?, "
            "100, 10, 2, 0)",
            (s.start_ns, s.end_ns),
        )

    at_version(store_url, monkeypatch, 4, fill)
    with migrated(store_url) as new:
        assert new.request_spans(["r"]) == [s]
        pending = new.request("r")
        assert pending is not None and pending.hosts == ("host-1",)


def test_prune_drops_an_old_span_from_a_chunk_it_shares_with_a_new_one(store: Store) -> None:
    now = T0_NS + 2 * HOUR
    # one write (one chunk): a replayed old span and a fresh one
    store.write_spans([span("old", end_s=10), span("new", start_s=7000, end_s=7100)])
    store.prune(now, raw_retention_s=3600, rollup_retention_s=3600)  # requests and raw kept 1 h
    assert store.request("old") is None
    assert store.spans_overlapping("host-1", T0_NS, T0_NS + 20 * S) == []


def test_a_damaged_chunk_costs_its_own_spans_only_and_says_so(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.write_spans([span("a", end_s=2)])  # a chunk each
    store.write_spans([span("b", start_s=1, end_s=3)])

    def damage(cursor: Any) -> None:
        cursor.execute("UPDATE span_chunks SET data = ? WHERE id = (SELECT MIN(id) FROM span_chunks)", (b"garbage",))

    store._run(damage, write=True)  # type: ignore[attr-defined]
    assert keys(store.spans_overlapping("host-1", T0_NS, T0_NS + 10 * S)) == [("b", "s1")]
    assert keys(store.request_spans(["a", "b"])) == [("b", "s1")]
    assert "span chunk" in caplog.text and "is damaged" in caplog.text and "host-1" in caplog.text
    assert store.write_spans([span("c", start_s=4, end_s=5)]) == 1  # writes go on
    assert store.prune(T0_NS + 2 * HOUR, raw_retention_s=3600, rollup_retention_s=86_400) == 3  # the damaged one too


# -- prune


def test_prune_drops_old_spans_and_bindings_and_settles_what_can_no_longer_be_computed(store: Store) -> None:
    now = T0_NS + 2 * HOUR
    store.write_spans([span("old-final", end_s=10), span("old-pending", start_s=5, end_s=20)])
    store.write_request_results([result("old-final", 4.0)])
    store.write_spans([span("new", start_s=2 * 3600 - 10, end_s=2 * 3600 - 5)])
    store.write_process_bindings(
        [
            ProcessBindingRow("host-1", 1, "old", "inference", "", T0_NS),
            ProcessBindingRow("host-1", 2, "older", "inference", "", T0_NS),
            ProcessBindingRow("host-1", 2, "mid", "inference", "", T0_NS + HOUR // 2),
            ProcessBindingRow("host-1", 2, "new", "inference", "", now - S),
        ]
    )
    # raw kept 1 h, requests 1 day: the two old spans and pid 2's older binding go; pid 1's stays, its newest (the
    # agent sends a binding when it changes: its process may run on), and so does pid 2's "mid", in effect at the
    # cutoff (for a span kept from before "new")
    assert store.prune(now, raw_retention_s=3600, rollup_retention_s=86_400) == 3
    assert keys(store.request_spans(["old-final", "old-pending", "new"])) == [("new", "s1")]
    kept = store.request("old-final")
    assert kept is not None and (kept.status, kept.active_j) == ("final", 4.0)
    gone = store.request("old-pending")
    assert gone is not None and (gone.status, gone.active_j) == ("no_samples", None)  # unknown, never 0 J
    assert store.pending_requests(10) == ["new"]
    assert [b.workload for b in store.process_bindings("host-1")] == ["old", "mid", "new"]
    assert store.prune(now, raw_retention_s=3600, rollup_retention_s=86_400) == 0
    # requests kept 1 h: the old ones go; raw kept a day: nothing else
    assert store.prune(now, raw_retention_s=86_400, rollup_retention_s=3600) == 2
    assert store.request("old-final") is None and store.request("old-pending") is None
    assert store.request("new") is not None


def test_prune_settles_a_pending_request_whose_early_spans_and_samples_are_gone(store: Store) -> None:
    """A span of "both" from 2 h ago, and a late one from now: pending, it can never be computed whole once the
    old span and its samples are pruned (computed from the new one alone, it would come back stale every pass)."""
    now = T0_NS + 2 * HOUR
    store.write_spans([span("both", "early", end_s=10), span("both", "late", start_s=7190, end_s=7195)])
    assert store.prune(now, raw_retention_s=3600, rollup_retention_s=86_400) == 1
    settled = store.request("both")
    assert settled is not None and (settled.status, settled.active_j, settled.spans) == ("no_samples", None, 2)
    assert store.pending_requests(10) == []


def test_prune_takes_an_old_requests_spans_with_it(store: Store) -> None:
    now = T0_NS + 2 * HOUR
    store.write_spans([span("old", end_s=10), span("old", "s2", end_s=11), span("new", start_s=7000, end_s=7100)])
    # raw samples kept longer than requests: the request goes with both its spans
    assert store.prune(now, raw_retention_s=86_400, rollup_retention_s=3600) == 3
    assert store.request("old") is None
    assert keys(store.request_spans(["old", "new"])) == [("new", "s1")]


# -- text


def test_unicode_and_the_longest_names_read_back_exactly(store: Store) -> None:
    long = {
        "request_id": "🔋" * MAX_TEXT,
        "span_id": "ü" * MAX_TEXT,
        "host": "主机" * (MAX_TEXT // 2),
        "workload": "w" * (MAX_TEXT - 1) + "é",
        "service_name": "'; DROP TABLE spans; --",
        "model": "模型-" + "m" * (MAX_TEXT - 3),
        "tenant": 'quote" back\\slash \t tab',
    }
    labels = {"ключ" * 10: "值" * MAX_TEXT, 'a"b': "c\\d", "emoji": "⚡🔌"}
    stored = span(
        long["request_id"],
        long["span_id"],
        host=long["host"],
        workload=long["workload"],
        service_name=long["service_name"],
        model=long["model"],
        tenant=long["tenant"],
        labels=labels,
    )
    assert store.write_spans([stored]) == 1
    assert store.request_spans([long["request_id"]]) == [stored]
    assert store.spans_overlapping(long["host"], 0, 2**62) == [stored]
    pending = store.request(long["request_id"])
    assert pending is not None
    assert (pending.model, pending.tenant, pending.hosts) == (long["model"], long["tenant"], (long["host"],))
    assert [r.request_id for r in store.requests(model=long["model"])] == [long["request_id"]]
    done = result(long["request_id"], model=long["model"], tenant=long["tenant"], hosts=("host-1", long["host"]))
    assert store.write_request_results([done]) == 1
    assert store.request(long["request_id"]) == done
    assert [row.group for row in store.request_summary("host", 0, 2**62)] == sorted([long["host"], "host-1"])
    binding = ProcessBindingRow(long["host"], 1, long["workload"], "inference", "ジョブ", T0_NS)
    store.write_process_bindings([binding])
    assert store.process_bindings(long["host"]) == [binding]


def test_a_nul_in_a_name_is_stored_as_a_replacement_character_on_both_backends(store: Store) -> None:
    # PostgreSQL cannot hold NUL in text; a span failing its batch's transaction would block the agent's stream
    assert store.write_spans([span("req\0a", host="host\0one", model="m\0", labels={"k": "v\0"})]) == 1
    (stored,) = store.request_spans(["req\0a"])
    assert (stored.request_id, stored.hostname, stored.model) == ("req\ufffda", "host\ufffdone", "m\ufffd")
    assert stored.labels == {"k": "v\0"}  # JSON carries it escaped
    assert store.request("req\0a") is not None
    assert store.spans_overlapping("host\0one", 0, 2**62) == [stored]
    store.write_process_bindings([ProcessBindingRow("host\0one", 1, "w\0", "", "", T0_NS)])
    assert [b.workload for b in store.process_bindings("host\0one")] == ["w\ufffd"]


# -- the benchmark


def test_the_request_store_benchmark_writes_reads_and_settles_every_span(tmp_path: Path) -> None:
    figures = bench_store_requests.run(spans=2_500, batch=1_000, hosts=3, directory=tmp_path)
    assert figures["spans"] == 2_500
    assert figures["write_spans_per_s"] > 0 and figures["write_results_per_s"] > 0
    assert 100 < figures["bytes_per_span"] < 10_000  # at least the ids, at most a page each
    assert list(tmp_path.iterdir()) == []  # its database is removed


# -- two writers


def test_two_writers_of_one_request_at_once_store_each_span_once_and_keep_every_host(store_url: str) -> None:
    """Two store objects (two aggregators on PostgreSQL) writing spans of the same requests at once, one span of
    each request from both: no deadlock, no span twice, no host lost."""
    stores = [open_store(store_url) for _ in range(2)]
    stores[0].migrate()
    try:
        n = 30
        barrier = threading.Barrier(2)

        def writer(k: int) -> None:
            for i in range(n):
                barrier.wait()
                # same request, same span id from both; plus one span per writer on its own host
                stores[k].write_spans(
                    [span(f"r{i}", "shared", host="host-1"), span(f"r{i}", f"own{k}", host=f"host-{k + 2}")]
                    + [span(f"x{j}", f"w{k}", host="host-1") for j in range(i, i + 5)]
                )

        errors = run_in_threads(writer, 2, timeout_s=60)
        assert not errors, errors
        for i in range(n):
            got = keys(stores[0].request_spans([f"r{i}"]))
            assert got == [(f"r{i}", "own0"), (f"r{i}", "own1"), (f"r{i}", "shared")]
            row = stores[0].request(f"r{i}")
            assert row is not None and row.spans == 3 and row.hosts == ("host-1", "host-2", "host-3")
    finally:
        for s in stores:
            s.close()


def test_request_states_are_status_and_energies_of_the_stored_ones(store: Store) -> None:
    store.write_spans([span("open"), span("done")])
    store.write_request_results(
        [RequestResult("done", "approximate", spans=1, start_ns=T0_NS, end_ns=T0_NS + S, active_j=2.5, full_j=3.0)]
    )
    assert store.request_states(["done", "open", "unknown", "done"]) == {
        "done": ("approximate", 2.5, 3.0, 1),
        "open": ("pending", None, None, 1),
    }
    assert store.request_states([]) == {}


def test_span_listeners_are_told_of_writes_whose_commit_was_lost(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[SpanColumns] = []
    missed: list[dict[str, int]] = []
    store.add_span_listener(heard.append, missed=missed.append)
    store.write_spans([span("a", start_s=1, end_s=2)])
    assert (len(heard), missed) == (1, [])
    run = store._run  # type: ignore[attr-defined]

    def committed_then_retried(work: Callable[[Any], Any], *, write: bool) -> Any:
        run(work, write=write)  # committed, but the outcome was lost: run again
        return run(work, write=write)

    monkeypatch.setattr(store, "_run", committed_then_retried)
    spans = [span("b", start_s=3, end_s=5), span("c", host="host-2", start_s=1, end_s=9)]
    assert store.write_spans(spans) == 0  # the second run found them stored: none new
    assert len(heard) == 1
    assert missed == [{"host-1": T0_NS + 5 * S, "host-2": T0_NS + 9 * S}]

    def committed_then_failed(work: Callable[[Any], Any], *, write: bool) -> Any:
        run(work, write=write)
        raise StoreError("the connection dropped at the commit")

    monkeypatch.setattr(store, "_run", committed_then_failed)
    with pytest.raises(StoreError):
        store.write_spans([span("d", start_s=6, end_s=7)])
    assert missed[-1] == {"host-1": T0_NS + 7 * S}
    monkeypatch.undo()
    store.write_spans([span("e", start_s=8, end_s=9)])
    assert (len(heard), len(missed)) == (2, 2)
