"""WorkloadSteps: steps messages booked under the workload the tracker gives their pid, bounded like energy."""

from __future__ import annotations

import pytest

from collector.registration import RegistrationEvent, StepsEvent
from collector.workloads import steps as steps_module
from collector.workloads.steps import WorkloadSteps
from collector.workloads.tracker import WorkloadKey

PID = 4242


class World:
    """The tracker's bindings and a monotonic clock, both set by the test."""

    def __init__(self) -> None:
        self.bindings: dict[int, WorkloadKey] = {}
        self.now_s = 1000.0

    def make(self, max_series: int = 500, retain_s: float = 600.0, unresolved_after_s: float = 5.0) -> WorkloadSteps:
        return WorkloadSteps(lambda: dict(self.bindings), max_series, retain_s, unresolved_after_s, lambda: self.now_s)


@pytest.fixture
def world() -> World:
    return World()


def registered(workload: str = "llama-ft", phase: str = "training", job: str = "") -> RegistrationEvent:
    return RegistrationEvent(PID, 0, 0, workload, phase, job)  # type: ignore[arg-type]


def exported(steps: WorkloadSteps) -> dict[tuple[str, ...], float]:
    (family,) = steps.families()
    assert family.name == "wattmeter_workload_steps" and family.type == "counter"
    assert all(name == "wattmeter_workload_steps_total" for name, _, _, _ in family.samples)
    return {labels: value for _, _, labels, value in family.samples}


def test_an_unregistered_process_counts_under_the_trackers_identity(world: World) -> None:
    steps = world.make()
    world.bindings[PID] = ("torchrun", "training", "slurm-9")
    steps.on_steps(StepsEvent(PID, 0, 0, 250))
    steps.on_steps(StepsEvent(PID, 0, 0, 750))
    assert exported(steps) == {("torchrun", "training", "slurm-9"): 1000.0}


def test_steps_wait_for_the_tracker_to_know_the_process(world: World) -> None:
    steps = world.make()
    steps.on_steps(StepsEvent(PID, 0, 0, 7))
    assert exported(steps) == {}  # not booked anywhere yet, and not lost
    world.now_s += 1.0
    world.bindings[PID] = ("python3", "unknown", "")  # the next scan saw it
    assert exported(steps) == {("python3", "unknown", ""): 7.0}


def test_a_registered_process_counts_under_its_registration_with_the_trackers_job(world: World) -> None:
    steps = world.make()
    world.bindings[PID] = ("python3", "unknown", "")  # the scan before the registration was applied
    steps.on_steps(StepsEvent(PID, 0, 0, 10, registered()))
    assert exported(steps) == {}  # the tracker names another workload: wait for it to apply the registration
    world.bindings[PID] = ("llama-ft", "training", "slurm-9")  # it filled the empty job in from SLURM_JOB_ID
    steps.on_steps(StepsEvent(PID, 0, 0, 3, registered(phase="inference")))  # sent after a phase change
    assert exported(steps) == {
        ("llama-ft", "training", "slurm-9"): 10.0,
        ("llama-ft", "inference", "slurm-9"): 3.0,  # the phase the steps were sent under, not the tracker's
    }


def test_a_process_never_identified_books_its_registration_or_unresolved(world: World) -> None:
    steps = world.make(unresolved_after_s=5.0)
    steps.on_steps(StepsEvent(PID, 0, 0, 4, registered(job="77")))
    steps.on_steps(StepsEvent(PID + 1, 0, 0, 6))
    world.now_s += 4.9
    assert exported(steps) == {}
    world.now_s += 0.2  # gone before any scan saw it
    assert exported(steps) == {("llama-ft", "training", "77"): 4.0, ("unresolved", "unknown", ""): 6.0}
    assert steps.unresolved == 6


def test_beyond_max_series_the_smallest_fold_into_other(world: World) -> None:
    steps = world.make(max_series=2)
    for pid, (name, count) in enumerate([("a", 100), ("b", 5), ("c", 50)], start=1):
        world.bindings[pid] = (name, "training", "")
        steps.on_steps(StepsEvent(pid, 0, 0, count))
    world.now_s += 1.0
    assert exported(steps) == {("a", "training", ""): 100.0, ("other", "", ""): 55.0}
    steps.on_steps(StepsEvent(2, 0, 0, 1))  # a folded workload keeps counting into other
    world.now_s += 1.0
    assert exported(steps)[("other", "", "")] == 56.0


def test_series_end_retain_s_after_the_workload_was_last_seen(world: World) -> None:
    steps = world.make(retain_s=60.0)
    world.bindings[1] = ("a", "training", "")
    world.bindings[2] = ("b", "training", "")
    steps.on_steps(StepsEvent(1, 0, 0, 1))
    steps.on_steps(StepsEvent(2, 0, 0, 2))
    assert set(exported(steps)) == {("a", "training", ""), ("b", "training", "")}
    del world.bindings[2]  # b's processes ended; a's live on without stepping (a long evaluation)
    world.now_s += 61.0
    assert exported(steps) == {("a", "training", ""): 1.0}


def test_pending_pids_are_bounded(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steps_module, "MAX_PENDING", 2)
    steps = world.make()
    for pid in (1, 2, 3):
        steps.on_steps(StepsEvent(pid, 0, 0, 1))
    assert exported(steps) == {("unresolved", "unknown", ""): 1.0}  # the third could not wait
    world.now_s += 6.0
    assert exported(steps) == {("unresolved", "unknown", ""): 3.0}
