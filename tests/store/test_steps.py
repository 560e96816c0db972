"""Training steps and workload labels in the store, on SQLite and on a real PostgreSQL server (the ``store`` fixture
is parametrized): cumulative counts become steps per minute, written in the batch's transaction."""

from __future__ import annotations

import dataclasses

from collector.store import Store
from collector.store.base import StepSeriesRow, StoredBatch, StoredLabelsRow, WorkloadLabelsRow, WorkloadStepsRow
from collector.store.migrations import LATEST_VERSION
from collector.store.steps import step_increments
from tests.store.builders import MINUTE_NS, T0_NS, TRAINING, batch

S = 1_000_000_000
FAR = 2**62


def with_steps(
    sequence: int, points: list[tuple[float, int]], *, workload: tuple[str, str, str] = TRAINING, **fields: object
) -> StoredBatch:
    """Batch ``sequence`` carrying ``workload``'s cumulative count at (seconds after T0, count) points."""
    base = batch(sequence, **fields)  # type: ignore[arg-type]
    series = StepSeriesRow(*workload, tuple(T0_NS + round(t * S) for t, _ in points), tuple(c for _, c in points))
    return dataclasses.replace(base, steps=(*base.steps, series))


def per_minute(store: Store, host: str = "host-1") -> dict[int, int]:
    """Minute index after T0 -> steps of TRAINING on ``host``."""
    out = {}
    for minute in range(-2, 10):
        start = T0_NS + minute * MINUTE_NS
        for row in store.workload_steps(start, start + MINUTE_NS):
            if row.hostname == host and (row.workload, row.phase, row.job) == TRAINING:
                out[minute] = row.steps
    return out


def test_migration_3_is_the_latest_and_applies_twice(store: Store) -> None:
    assert LATEST_VERSION >= 3
    assert store.migrate() == LATEST_VERSION  # already migrated by the fixture: a no-op


def test_cumulative_counts_become_steps_per_minute(store: Store) -> None:
    store.write_batch(with_steps(1, [(10, 5), (50, 12)]))
    store.write_batch(with_steps(2, [(70, 20)]))  # minute 1
    store.write_batch(with_steps(3, [(130, 20)]))  # unchanged (a resend): nothing
    assert per_minute(store) == {0: 12, 1: 8}
    assert store.workload_steps(T0_NS, T0_NS + 10 * MINUTE_NS) == [
        WorkloadStepsRow("host-1", *TRAINING, steps=20, minutes=2)
    ]
    assert store.workload_steps(T0_NS + MINUTE_NS, T0_NS + 10 * MINUTE_NS)[0].steps == 8  # the window's minutes only


def test_a_replayed_batch_adds_nothing_twice(store: Store) -> None:
    first = with_steps(1, [(10, 5)])
    store.write_batch(first)
    result = store.write_batch(first)
    assert not result.stored
    store.write_batches([with_steps(2, [(20, 9)]), with_steps(2, [(20, 9)])])  # twice in one group
    assert per_minute(store) == {0: 9}


def test_a_count_that_restarts_counts_from_zero_and_instances_count_apart(store: Store) -> None:
    store.write_batch(with_steps(1, [(10, 100)]))
    store.write_batch(with_steps(2, [(20, 3)]))  # the agent's series expired and started again
    # a second agent instance on the same host: its count starts at 0, its first count is all new steps
    store.write_batch(with_steps(1, [(30, 7)], instance="instance-b"))
    # another host's workload of the same name is its own
    store.write_batch(with_steps(1, [(40, 50)], instance="instance-c", host="host-2"))
    assert per_minute(store) == {0: 110}
    assert per_minute(store, "host-2") == {0: 50}


def test_a_point_not_after_the_last_stored_adds_nothing(store: Store) -> None:
    # batch 3 arrives before batch 2 (out of order): its count already holds batch 2's steps
    store.write_batch(with_steps(1, [(10, 5)]))
    store.write_batch(with_steps(3, [(70, 30)]))
    store.write_batch(with_steps(2, [(40, 18)]))
    assert per_minute(store) == {0: 5, 1: 25}


def test_several_batches_of_one_instance_in_one_group_follow_one_another(store: Store) -> None:
    results = store.write_batches([with_steps(1, [(10, 4)]), with_steps(2, [(20, 6)]), with_steps(3, [(65, 10)])])
    assert [r.stored for r in results] == [True, True, True]
    assert per_minute(store) == {0: 6, 1: 4}


def test_steps_of_a_batch_without_samples_are_stored() -> None:
    increments, last = step_increments(None, [T0_NS + 5 * S, T0_NS + 61 * S], [3, 3])
    assert increments == [(T0_NS, 3)]
    assert last == (T0_NS + 61 * S, 3)


def labelled(sequence: int, labels: dict[str, str], seen_s: float, **fields: object) -> StoredBatch:
    base = batch(sequence, **fields)  # type: ignore[arg-type]
    row = WorkloadLabelsRow(*TRAINING, labels, T0_NS + round(seen_s * S))
    return dataclasses.replace(base, workload_labels=(row,))


def test_labels_are_the_newest_set_and_a_replay_does_not_bring_old_ones_back(store: Store) -> None:
    store.write_batch(labelled(1, {"flexible": "true", "team": "nlp"}, 1))
    assert store.workload_labels() == [
        StoredLabelsRow("host-1", *TRAINING, {"flexible": "true", "team": "nlp"}, T0_NS + S)
    ]
    store.write_batch(labelled(2, {"team": "nlp"}, 5))  # the whole set: flexible went
    # an agent instance's spool replays an older batch after the newer one was stored
    store.write_batch(labelled(1, {"flexible": "yes"}, 3, instance="instance-old"))
    assert [row.labels for row in store.workload_labels()] == [{"team": "nlp"}]
    assert store.workload_labels(since_ns=T0_NS + 6 * S) == []
    # one group naming the workload twice: the later set wins
    store.write_batches([labelled(3, {"a": "1"}, 7), labelled(4, {"b": "2"}, 7)])
    assert [row.labels for row in store.workload_labels()] == [{"b": "2"}]


def test_labels_and_steps_of_a_duplicate_batch_are_not_written(store: Store) -> None:
    store.write_batch(batch(1))
    store.write_batch(labelled(1, {"flexible": "true"}, 1))  # the same sequence again: a duplicate
    assert store.workload_labels() == []
    store.write_batch(with_steps(1, [(10, 5)]))
    assert store.workload_steps(0, FAR) == []


def test_prune_drops_old_steps_labels_and_idle_counters(store: Store) -> None:
    store.write_batch(with_steps(1, [(10, 5)]))
    store.write_batch(labelled(2, {"flexible": "true"}, 20))
    store.write_batch(with_steps(3, [(3600 * 2, 9)]))  # two hours on: the counter moved then
    now_ns = T0_NS + 3 * 3600 * S
    store.prune(now_ns, raw_retention_s=3600 * 1.5, rollup_retention_s=3600 * 2)
    # the first minute is past the rollup retention (and the labels with it); the minute two hours on is not
    assert per_minute(store) == {}
    assert sum(r.steps for r in store.workload_steps(0, FAR)) == 4
    assert store.workload_labels() == []
    # the counter moved within the raw retention: kept, so the next count adds only what is new
    store.write_batch(with_steps(4, [(3600 * 2 + 60, 10)]))
    assert sum(r.steps for r in store.workload_steps(0, FAR)) == 5
    # a counter idle past the raw retention goes: that series is gone from its agent, whose count restarted
    store.prune(now_ns + 3600 * S, raw_retention_s=60, rollup_retention_s=3600 * 10)
    store.write_batch(with_steps(5, [(3600 * 4, 2)]))
    assert sum(r.steps for r in store.workload_steps(0, FAR)) == 7
