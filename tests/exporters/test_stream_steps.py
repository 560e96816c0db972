"""Training steps and workload labels in the telemetry stream: which counts and label sets go in the next batch
(``StepChanges``, ``LabelChanges``), and the exporter spooling them from a real ``WorkloadSteps`` and tracker."""

from __future__ import annotations

import os
from pathlib import Path

from collector.config import WorkloadsConfig
from collector.exporters.batching import LabelChanges, StepChanges
from collector.exporters.grpc_stream import StreamExporter
from collector.proto import wattmeter_pb2 as pb
from collector.registration import RegistrationEvent, StepsEvent
from collector.workloads.identity import WorkloadIdentity
from collector.workloads.steps import WorkloadSteps
from collector.workloads.tracker import WorkloadTracker
from tests.fakes.telemetry import static_sampler, stream_config

TRAIN = ("train", "training", "7")
SERVE = ("serve", "inference", "")
BIG = 1 << 20


def points(series: list[pb.StepSeries]) -> dict[tuple[str, str, str], list[tuple[int, int]]]:
    return {
        (s.workload.workload, s.workload.phase, s.workload.job): list(zip(s.time_ns, s.count, strict=True))
        for s in series
    }


def test_step_counts_go_when_they_move_and_all_again_every_resend() -> None:
    changes = StepChanges(resend_s=60.0)
    changes.update({TRAIN: 5, SERVE: 2}, time_ns=100, now_s=0.0)
    assert points(changes.take(BIG)) == {TRAIN: [(100, 5)], SERVE: [(100, 2)]}
    changes.update({TRAIN: 5, SERVE: 2}, time_ns=200, now_s=1.0)
    assert changes.take(BIG) == [] and changes.pending == 0  # nothing moved
    changes.update({TRAIN: 9, SERVE: 2}, time_ns=300, now_s=2.0)
    changes.update({TRAIN: 12, SERVE: 2}, time_ns=400, now_s=3.0)  # not taken in between: both points wait
    assert points(changes.take(BIG)) == {TRAIN: [(300, 9), (400, 12)]}
    changes.update({TRAIN: 12, SERVE: 2}, time_ns=500, now_s=61.0)  # the resend: every count, moved or not
    assert points(changes.take(BIG)) == {TRAIN: [(500, 12)], SERVE: [(500, 2)]}


def test_a_wall_clock_step_back_updates_the_waiting_point_and_a_workload_gone_starts_again() -> None:
    changes = StepChanges()
    changes.update({TRAIN: 5}, time_ns=1000, now_s=0.0)
    changes.update({TRAIN: 8}, time_ns=900, now_s=1.0)  # the clock went back: no point out of order
    assert points(changes.take(BIG)) == {TRAIN: [(1000, 8)]}
    changes.update({}, time_ns=1100, now_s=2.0)  # expired on the agent
    changes.update({TRAIN: 8}, time_ns=1200, now_s=3.0)  # back (from 0 again): sent though the count is the same
    assert points(changes.take(BIG)) == {TRAIN: [(1200, 8)]}


def test_step_series_past_the_budget_wait_for_the_next_batch() -> None:
    changes = StepChanges()
    changes.update({TRAIN: 1, SERVE: 1}, time_ns=1, now_s=0.0)
    first = changes.take(100)  # room for one series
    assert len(first) == 1 and changes.pending == 1
    assert len(changes.take(BIG)) == 1 and changes.pending == 0


def test_labels_go_when_new_or_changed_and_again_every_resend() -> None:
    changes = LabelChanges(resend_s=300.0)
    flexible = (("flexible", "true"),)
    changes.update({TRAIN: flexible, SERVE: ()}, now_s=0.0)  # a workload without labels sends nothing
    assert [(m.workload.workload, dict(m.labels)) for m in changes.take(BIG)] == [("train", {"flexible": "true"})]
    changes.update({TRAIN: flexible, SERVE: ()}, now_s=10.0)
    assert changes.take(BIG) == []
    changes.update({TRAIN: (), SERVE: (("team", "a"),)}, now_s=20.0)  # train's labels went: sent empty
    assert {m.workload.workload: dict(m.labels) for m in changes.take(BIG)} == {"train": {}, "serve": {"team": "a"}}
    changes.update({TRAIN: (), SERVE: (("team", "a"),)}, now_s=320.0)  # the resend: those with labels
    assert [m.workload.workload for m in changes.take(BIG)] == ["serve"]


def test_the_exporter_spools_steps_and_labels_from_the_workload_steps_and_the_tracker(tmp_path: Path) -> None:
    sampler = static_sampler()
    tracker = WorkloadTracker(WorkloadsConfig(proc_root=tmp_path), sampler)
    tracker.identities[TRAIN] = WorkloadIdentity(*TRAIN, origin="registration", labels=(("flexible", "true"),))
    me = os.getpid()
    steps = WorkloadSteps(lambda: {me: TRAIN}, max_series=100, retain_s=600.0, unresolved_after_s=5.0)
    registration = RegistrationEvent(me, 0, 0, "train", "training", "7", labels={"flexible": "true"})
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "machine-id").write_text("m-1\n")
    exporter = StreamExporter(
        stream_config(tmp_path, "127.0.0.1:9"), sampler, tracker, steps=steps, host_root=root, bindings_interval_s=0
    )
    try:
        for _ in range(3):
            steps.on_steps(StepsEvent(me, 0, 0, count=4, registration=registration))
        assert exporter.flush() == 1
        steps.on_steps(StepsEvent(me, 0, 0, count=1, registration=registration))
        assert exporter.flush() == 1
        assert exporter.flush() == 0  # nothing moved: no batch
        batches = [pb.Batch.FromString(payload) for _, payload in exporter.spool.read_from(0)]
    finally:
        exporter.stop()
    assert [[c for s in b.steps for c in s.count] for b in batches] == [[12], [13]]
    assert [s.workload.job for b in batches for s in b.steps] == ["7", "7"]
    assert [[dict(m.labels) for m in b.labels] for b in batches] == [[{"flexible": "true"}], []]
