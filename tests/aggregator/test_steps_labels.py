"""Training steps and workload labels in a batch: checked (an invalid series or label set is dropped with its reason
and counted, the rest of the batch stored), marshalled between processes, and stored with the batch through the
real gRPC server into SQLite."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from collector.aggregator.checks import (
    MAX_STEP_COUNT,
    MAX_WORKLOAD_LABELS,
    Limits,
    check,
    from_wire,
    to_wire,
)
from collector.proto import wattmeter_pb2 as pb
from collector.store.base import StepSeriesRow, WorkloadLabelsRow
from tests.aggregator.conftest import RunningAggregator, now_ns, send, simple_batch

LIMITS = Limits(max_future_s=300.0, max_batch_samples=1_000_000)
SECOND = 1_000_000_000
TRAIN = pb.WorkloadIdentity(workload="train", phase="training", job="7")


def with_facts(start_ns: int, sequence: int = 1) -> pb.Batch:
    """A valid batch (gpu0 and its workloads) with train/training/7's steps and labels."""
    message = simple_batch(sequence, start_ns)
    message.steps.add(workload=TRAIN, time_ns=[start_ns + SECOND, start_ns + 2 * SECOND], count=[10, 25])
    message.labels.add(workload=TRAIN, labels={"flexible": "true"})
    return message


def test_valid_steps_and_labels_are_kept_and_survive_marshalling() -> None:
    start = now_ns() - 10 * SECOND
    message = with_facts(start)
    checked = check(message.SerializeToString(), now_ns(), LIMITS)
    assert checked.refusal is None and checked.dropped == []
    assert checked.steps == [StepSeriesRow("train", "training", "7", (start + SECOND, start + 2 * SECOND), (10, 25))]
    assert checked.labels == [WorkloadLabelsRow("train", "training", "7", {"flexible": "true"}, message.created_ns)]
    assert from_wire(to_wire(checked)) == checked


Mutation = Callable[[pb.Batch, int], None]


def _steps(**fields: object) -> Mutation:
    def mutate(message: pb.Batch, start: int) -> None:
        values: dict[str, object] = {"workload": TRAIN, "time_ns": [start], "count": [1], **fields}
        message.steps.add(**values)

    return mutate


def _labels(labels: dict[str, str], identity: pb.WorkloadIdentity = TRAIN) -> Mutation:
    def mutate(message: pb.Batch, start: int) -> None:
        message.labels.add(workload=identity, labels=labels)

    return mutate


def _future_steps(message: pb.Batch, start: int) -> None:
    message.steps.add(workload=TRAIN, time_ns=[now_ns() + 3600 * SECOND], count=[1])


def _twice(message: pb.Batch, start: int) -> None:
    message.steps.add(workload=TRAIN, time_ns=[start], count=[1])
    message.steps.add(workload=TRAIN, time_ns=[start + 1], count=[2])


def _labels_twice(message: pb.Batch, start: int) -> None:
    message.labels.add(workload=TRAIN, labels={"a": "1"})
    message.labels.add(workload=TRAIN, labels={"a": "2"})


def _many_labels(message: pb.Batch, start: int) -> None:
    message.labels.add(workload=TRAIN, labels={f"l{i}": "x" for i in range(MAX_WORKLOAD_LABELS + 1)})


BAD_STEPS: dict[str, tuple[Mutation, str]] = {
    "counts mismatch": (_steps(count=[1, 2]), "1 time_ns but 2 count values"),
    "no points": (_steps(time_ns=[], count=[]), "no points"),
    "time zero": (_steps(time_ns=[0]), "is not after the point before it"),
    "time backwards": (_steps(time_ns=[2, 1], count=[1, 2]), "not after"),
    "future": (_future_steps, "is in the future"),
    "count too big": (_steps(count=[MAX_STEP_COUNT + 1]), "a counter error"),
    "empty workload": (_steps(workload=pb.WorkloadIdentity(phase="training")), "workload is empty"),
    "bad phase": (_steps(workload=pb.WorkloadIdentity(workload="w", phase="tuning")), "unknown phase 'tuning'"),
    "empty phase": (_steps(workload=pb.WorkloadIdentity(workload="w")), "phase is empty"),
    "control characters": (_steps(workload=pb.WorkloadIdentity(workload="a\nb", phase="unknown")), "control"),
    "twice": (_twice, "appear twice in the batch"),
}

BAD_LABELS: dict[str, tuple[Mutation, str]] = {
    "too many": (_many_labels, f"{MAX_WORKLOAD_LABELS + 1} labels, more than {MAX_WORKLOAD_LABELS}"),
    "empty name": (_labels({"": "x"}), "a label name is empty"),
    "control name": (_labels({"a\tb": "x"}), "has control characters"),
    "long value": (_labels({"team": "x" * 257}), "the value is longer than 256 characters"),
    "bad phase": (_labels({"a": "1"}, pb.WorkloadIdentity(workload="w", phase="later")), "unknown phase 'later'"),
    "twice": (_labels_twice, "labels appear twice in the batch"),
}


@pytest.mark.parametrize("name", list(BAD_STEPS))
def test_a_bad_steps_series_is_dropped_with_its_reason_and_the_batch_kept(name: str) -> None:
    mutate, reason = BAD_STEPS[name]
    start = now_ns() - 10 * SECOND
    message = simple_batch(1, start)
    mutate(message, start)
    message.steps.add(workload=pb.WorkloadIdentity(workload="ok", phase="inference"), time_ns=[start], count=[3])
    checked = check(message.SerializeToString(), now_ns(), LIMITS)
    assert checked.refusal is None and checked.rows is not None  # the samples are stored all the same
    assert "steps" in checked.dropped
    assert any(reason in note and "dropped steps[" in note for note in checked.notes), checked.notes
    assert [row.workload for row in checked.steps][-1] == "ok"  # the valid series after it is kept


@pytest.mark.parametrize("name", list(BAD_LABELS))
def test_a_bad_label_set_is_dropped_with_its_reason_and_the_batch_kept(name: str) -> None:
    mutate, reason = BAD_LABELS[name]
    start = now_ns() - 10 * SECOND
    message = simple_batch(1, start)
    mutate(message, start)
    checked = check(message.SerializeToString(), now_ns(), LIMITS)
    assert checked.refusal is None and checked.rows is not None
    assert "workload_labels" in checked.dropped
    assert any(reason in note and "dropped labels[" in note for note in checked.notes), checked.notes


def test_steps_and_labels_are_stored_with_their_batch(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    message = with_facts(start)
    message.steps.add(workload=pb.WorkloadIdentity(workload="bad", phase="nope"), time_ns=[start], count=[1])
    assert send(channel, [message]).acks[0].rejected_sequence == 0
    store = aggregator.aggregator.store
    rows = store.workload_steps(0, 2**62)
    assert [(r.hostname, r.workload, r.phase, r.job, r.steps) for r in rows] == [
        ("host-a", "train", "training", "7", 25)
    ]
    labels = store.workload_labels()
    assert [(r.hostname, r.workload, r.labels) for r in labels] == [("host-a", "train", {"flexible": "true"})]
    assert dict(aggregator.aggregator.metrics.dropped_fields) == {"steps": 1}
    # the batch again (a replay): nothing twice
    assert send(channel, [message]).acks[0].acked_sequence == 1
    assert store.workload_steps(0, 2**62)[0].steps == 25
    # the next batch's cumulative count adds only what is new
    following = simple_batch(2, start + SECOND, energy0=1090.0)
    following.steps.add(workload=TRAIN, time_ns=[start + 3 * SECOND], count=[40])
    assert send(channel, [following]).acks[0].rejected_sequence == 0
    assert sum(r.steps for r in store.workload_steps(0, 2**62)) == 40
