"""Training steps and workload labels in the store (issue 7), in SQL that SQLite and PostgreSQL both run.

Agents send each workload's cumulative step count (``StepSeriesRow``: the agent instance's count since it
started); the store keeps every (instance, workload)'s last count (``step_counters``) and adds each new count's
difference to the minute of its time (``workload_steps``), so steps per workload per minute are a sum, like the
energy rollups. A count below the last one means the agent's count started again from 0 (its series expired): the
count itself is new steps. A point not after the last one stored (a batch replayed out of order) adds nothing: the
later count already holds its steps. The first count of an instance counts in full (its count starts at 0).

Labels (``WorkloadLabelsRow``) are a workload's whole set as its agent last reported it, one row per (host,
workload): a batch made before the stored row (a replay) changes nothing.

``StepsWrite.write`` runs inside the group write's transaction (``writes.GroupWrite``), for the batches it stored:
the instances' rows are locked by then, so two writes of one instance's counters never interleave. Rows go in
sorted order, so aggregators sharing a PostgreSQL database lock them in one order.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from collector.store.base import StoredBatch, StoredLabelsRow, WorkloadStepsRow, WriteResult
from collector.store.dialect import Dialect

if TYPE_CHECKING:  # writes.py imports this module
    from collector.store.writes import Cursor

MINUTE_NS = 60_000_000_000
ROWS_PER_STATEMENT = 500
CounterKey = tuple[str, str, str, str]  # instance id, workload, phase, job
Counter = tuple[int, int]  # time_ns, total
BucketKey = tuple[int, str, str, str, str]  # minute, host, workload, phase, job
LabelsKey = tuple[str, str, str, str]  # host, workload, phase, job


def _insert(cursor: Cursor, head: str, row: str, rows: Sequence[Sequence[Any]], tail: str) -> None:
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start : start + ROWS_PER_STATEMENT]
        marks = ", ".join([row] * len(chunk))
        cursor.execute(f"{head} VALUES {marks}{tail}", list(itertools.chain.from_iterable(chunk)))


def step_increments(
    last: Counter | None, time_ns: Sequence[int], count: Sequence[int]
) -> tuple[list[tuple[int, int]], Counter | None]:
    """The steps each point adds, as (minute_ns, steps) with steps > 0, and the counter after the points."""
    out: list[tuple[int, int]] = []
    for t, c in zip(time_ns, count, strict=True):
        if last is not None and t <= last[0]:
            continue  # not after the last count stored: that count already holds these steps
        added = c if last is None or c < last[1] else c - last[1]
        last = (t, c)
        if added > 0:
            out.append((t - t % MINUTE_NS, added))
    return out, last


class StepsWrite:
    """The statements for one dialect; ``write`` is the group write's hook."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect

    def write(self, cursor: Cursor, batches: Sequence[StoredBatch], results: Sequence[WriteResult]) -> None:
        """The steps and labels of the ``batches`` this transaction stores (``results``: whether each is), in order;
        a replay's are in the database already."""
        if not any(batch.steps or batch.workload_labels for batch in batches):
            return
        stored = [batch for batch, result in zip(batches, results, strict=True) if result.stored]
        with_steps = [batch for batch in stored if batch.steps]
        if with_steps:
            self._write_steps(cursor, with_steps)
        if any(batch.workload_labels for batch in stored):
            self._write_labels(cursor, stored)

    def _write_steps(self, cursor: Cursor, batches: Sequence[StoredBatch]) -> None:
        instances = sorted({batch.instance_id for batch in batches})
        counters: dict[CounterKey, Counter] = {}
        for start in range(0, len(instances), ROWS_PER_STATEMENT):
            chunk = instances[start : start + ROWS_PER_STATEMENT]
            cursor.execute(
                "SELECT instance_id, workload, phase, job, time_ns, total FROM step_counters "
                f"WHERE instance_id IN ({', '.join(['?'] * len(chunk))})",
                chunk,
            )
            for instance_id, workload, phase, job, time_ns, total in cursor.fetchall():
                counters[(instance_id, workload, phase, job)] = (int(time_ns), int(total))
        changed: dict[CounterKey, Counter] = {}
        buckets: dict[BucketKey, int] = {}
        for batch in batches:
            hostname = batch.host.hostname
            for series in batch.steps:
                key = (batch.instance_id, series.workload, series.phase, series.job)
                increments, last = step_increments(counters.get(key), series.time_ns, series.count)
                if last is not None and last != counters.get(key):
                    counters[key] = changed[key] = last
                for minute, steps in increments:
                    bucket = (minute, hostname, series.workload, series.phase, series.job)
                    buckets[bucket] = buckets.get(bucket, 0) + steps
        _insert(
            cursor,
            "INSERT INTO step_counters (instance_id, workload, phase, job, time_ns, total)",
            "(?, ?, ?, ?, ?, ?)",
            [key + value for key, value in sorted(changed.items())],
            " ON CONFLICT (instance_id, workload, phase, job) DO UPDATE SET time_ns = excluded.time_ns, "
            "total = excluded.total",
        )
        _insert(
            cursor,
            "INSERT INTO workload_steps (minute_ns, hostname, workload, phase, job, steps)",
            "(?, ?, ?, ?, ?, ?)",
            [(*bucket, steps) for bucket, steps in sorted(buckets.items())],
            " ON CONFLICT (minute_ns, hostname, workload, phase, job) "
            "DO UPDATE SET steps = workload_steps.steps + excluded.steps",
        )

    def _write_labels(self, cursor: Cursor, batches: Sequence[StoredBatch]) -> None:
        newest: dict[LabelsKey, tuple[int, str]] = {}  # a statement names a row once (PostgreSQL)
        for batch in batches:
            for row in batch.workload_labels:
                key = (batch.host.hostname, row.workload, row.phase, row.job)
                known = newest.get(key)
                if known is None or row.seen_ns >= known[0]:
                    newest[key] = (row.seen_ns, json.dumps(row.labels, sort_keys=True))
        _insert(
            cursor,
            "INSERT INTO workload_labels (hostname, workload, phase, job, labels, seen_ns)",
            "(?, ?, ?, ?, ?, ?)",
            [(*key, labels, seen_ns) for key, (seen_ns, labels) in sorted(newest.items())],
            " ON CONFLICT (hostname, workload, phase, job) DO UPDATE SET labels = excluded.labels, "
            "seen_ns = excluded.seen_ns WHERE excluded.seen_ns >= workload_labels.seen_ns",
        )


def prune_steps(cursor: Cursor, last_old_minute: int, rollup_cutoff_ns: int, raw_cutoff_ns: int) -> int:
    """Inside ``Store.prune``'s transaction: steps per minute go with the rollups (minutes starting at or before
    ``last_old_minute``), labels last reported before ``rollup_cutoff_ns`` with them, and step counters not moved since
    ``raw_cutoff_ns`` (an agent resends a live workload's count every minute, so such a counter's series is gone
    from its agent, whose count would start again from 0). Returns the rows deleted."""
    deleted = 0
    for statement, cutoff in (
        ("DELETE FROM workload_steps WHERE minute_ns <= ?", last_old_minute),
        ("DELETE FROM workload_labels WHERE seen_ns < ?", rollup_cutoff_ns),
        ("DELETE FROM step_counters WHERE time_ns < ?", raw_cutoff_ns),
    ):
        cursor.execute(statement, (cutoff,))
        deleted += max(cursor.rowcount, 0)
    return deleted


class StepsReads:
    """``Store.workload_steps`` and ``Store.workload_labels`` for ``SqlStore`` (which provides ``_run``)."""

    if TYPE_CHECKING:
        _run: Callable[..., Any]

    def workload_steps(self, since_ns: int, until_ns: int) -> list[WorkloadStepsRow]:
        def work(cursor: Cursor) -> list[Any]:
            cursor.execute(
                "SELECT hostname, workload, phase, job, SUM(steps), COUNT(*) FROM workload_steps "
                "WHERE minute_ns >= ? AND minute_ns < ? GROUP BY hostname, workload, phase, job "
                "ORDER BY hostname, workload, phase, job",
                (since_ns, until_ns),
            )
            return cursor.fetchall()

        rows: list[Any] = self._run(work, write=False)
        return [WorkloadStepsRow(h, w, p, j, int(steps), int(minutes)) for h, w, p, j, steps, minutes in rows]

    def workload_labels(self, since_ns: int = 0) -> list[StoredLabelsRow]:
        def work(cursor: Cursor) -> list[Any]:
            cursor.execute(
                "SELECT hostname, workload, phase, job, labels, seen_ns FROM workload_labels WHERE seen_ns >= ? "
                "ORDER BY hostname, workload, phase, job",
                (since_ns,),
            )
            return cursor.fetchall()

        rows: list[Any] = self._run(work, write=False)
        return [StoredLabelsRow(h, w, p, j, json.loads(labels), int(seen)) for h, w, p, j, labels, seen in rows]
