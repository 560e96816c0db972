"""The tracker end to end in process: fake /proc, a simulated GPU and a CPU source, readings driven by hand."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.attribution import IDLE, SYSTEM
from collector.config import WorkloadsConfig
from collector.exporters.exposition import Family
from collector.exporters.families import workload_families
from collector.readings import DeviceInfo, DeviceKind, DeviceReading, DeviceStatus, GpuProcess
from collector.sampler import Sampler, SourceState
from collector.sources.base import Source
from collector.workloads.identity import WorkloadIdentity
from collector.workloads.tracker import WorkloadTracker
from tests.fakes.proc import FakeProc


class ScriptedSource(Source):
    """One GPU and one CPU package with energies and GPU processes set by the test."""

    name = "scripted"

    def __init__(self) -> None:
        self.energy = {"gpu0": 0.0, "cpu0": 0.0}
        self.gpu_processes: tuple[GpuProcess, ...] = ()

    def devices(self) -> Sequence[DeviceInfo]:
        return [
            DeviceInfo("gpu0", DeviceKind.GPU, self.name, "NVIDIA", "H100", 0, uuid="GPU-0"),
            DeviceInfo("cpu0", DeviceKind.CPU, self.name, "Intel", "Xeon", 0, package="0", domain="package"),
        ]

    def read(self) -> Sequence[DeviceReading]:
        now = time.monotonic_ns()
        return [DeviceReading(d, e, None, now, time.time_ns()) for d, e in self.energy.items()]

    def read_status(self) -> Sequence[DeviceStatus]:
        return [DeviceStatus("gpu0", processes=self.gpu_processes)]


def fake_host(root: Path) -> FakeProc:
    """A /proc with init and 1,000 ticks of CPU time so far."""
    proc = FakeProc(root)
    proc.set_total_cpu(1000)
    proc.add(1, 0, "systemd", "/sbin/init")
    return proc


def attach(proc: FakeProc, **workloads: object) -> tuple[ScriptedSource, Sampler, WorkloadTracker]:
    """A scripted GPU and CPU, sampled, with a tracker on ``proc``; the first readings are the baseline."""
    source = ScriptedSource()
    sampler = Sampler([source])
    state = sampler.states[0]
    sampler.mark_opened(state)
    tracker = WorkloadTracker(WorkloadsConfig(proc_root=proc.root, **workloads), sampler)
    sampler.add_listener(tracker.on_readings)
    sampler._read_once(state)
    return source, sampler, tracker


@pytest.fixture
def world(tmp_path: Path) -> tuple[FakeProc, ScriptedSource, Sampler, WorkloadTracker]:
    proc = fake_host(tmp_path / "proc")
    proc.add(100, 1, "torchrun", "torchrun --nproc-per-node 8 train.py", environ={"WATTMETER_JOB": "j7"})
    proc.add(101, 100, "python", "python train.py --rank 0", utime=100)
    proc.add(200, 1, "vllm", "vllm serve meta-llama/Llama-3.1-8B", utime=50)
    return (proc, *attach(proc))


def step(source: ScriptedSource, sampler: Sampler, gpu_j: float, cpu_j: float) -> None:
    source.energy["gpu0"] += gpu_j
    source.energy["cpu0"] += cpu_j
    sampler._read_once(sampler.states[0])


def totals(tracker: WorkloadTracker) -> dict[tuple[object, str], float]:
    series, _ = tracker.snapshot()
    return {(key, device): joules for key, device, joules, _ in series}


def test_energy_splits_by_cpu_time_and_gpu_processes_and_adds_up(world: tuple) -> None:  # type: ignore[type-arg]
    proc, source, sampler, tracker = world
    tracker.scan()  # first scan: a baseline of CPU times, no CPU shares yet
    step(source, sampler, gpu_j=70.0, cpu_j=10.0)
    assert totals(tracker) == {(IDLE, "gpu0"): 70.0, (SYSTEM, "cpu0"): 10.0}

    proc.set_cpu(101, utime=400, stime=0)  # the trainer used 300 ticks
    proc.set_cpu(200, utime=150, stime=0)  # the server 100
    proc.set_total_cpu(2000)  # of 1000 ticks in all
    source.gpu_processes = (GpuProcess(101, sm_utilization_ratio=0.75), GpuProcess(200, sm_utilization_ratio=0.25))
    sampler._status_once(sampler.states[0])
    tracker.scan()
    step(source, sampler, gpu_j=400.0, cpu_j=100.0)
    step(source, sampler, gpu_j=200.0, cpu_j=50.0)  # shares hold until the next scan

    got = totals(tracker)
    trainer = ("torchrun", "training", "j7")
    server = ("Llama-3.1-8B", "inference", "")
    keys = {key for key, _ in got}
    assert trainer in keys and server in keys, keys
    assert got[(trainer, "gpu0")] == pytest.approx(600.0 * 0.75)
    assert got[(server, "gpu0")] == pytest.approx(600.0 * 0.25)
    assert got[(trainer, "cpu0")] == pytest.approx(150.0 * 0.3)
    assert got[(server, "cpu0")] == pytest.approx(150.0 * 0.1)
    assert got[(SYSTEM, "cpu0")] == pytest.approx(10.0 + 150.0 * 0.6)
    for device, energy in (("gpu0", 670.0), ("cpu0", 160.0)):  # conservation: workloads + idle/system = device
        assert sum(j for (key, d), j in got.items() if d == device) == pytest.approx(energy, rel=1e-12)
    assert tracker.phase_energy_j["training"] == pytest.approx(450.0 + 45.0)


def families_after_one_window(world: tuple) -> dict[str, Family]:  # type: ignore[type-arg]
    """Two scans (pid 101 busy on the CPU and alone on gpu0), one reading of 100 J (GPU) and 10 J (CPU)."""
    proc, source, sampler, tracker = world
    tracker.scan()
    proc.set_cpu(101, utime=200, stime=0)
    proc.set_total_cpu(1500)
    source.gpu_processes = (GpuProcess(101),)
    sampler._status_once(sampler.states[0])
    tracker.scan()
    step(source, sampler, gpu_j=100.0, cpu_j=10.0)
    return {family.name: family for family in workload_families(tracker)}


def test_exported_families(world: tuple) -> None:  # type: ignore[type-arg]
    families = families_after_one_window(world)
    energy = {labels: value for _, _, labels, value in families["wattmeter_workload_energy_joules"].samples}
    assert energy[("torchrun", "training", "j7", "gpu0")] == pytest.approx(100.0)
    assert energy[("system", "", "", "cpu0")] == pytest.approx(10.0 * 0.8)
    info = [labels for _, _, labels, _ in families["wattmeter_workload_info"].samples]
    assert ("torchrun", "training", "j7", "", "", "", "", "") in info
    assert families["wattmeter_idle_energy_joules"].samples[0][2] == ("gpu0",)


def test_registered_labels_are_exported_as_label_info(world: tuple) -> None:  # type: ignore[type-arg]
    tracker = world[3]
    identity = WorkloadIdentity(
        "llama-ft", "training", "r1", origin="registration", labels=(("model", "llama-70b"), ("team", "nlp"))
    )
    tracker.register(101, identity)
    families = families_after_one_window(world)
    labels = sorted(labels for _, _, labels, _ in families["wattmeter_workload_label_info"].samples)
    assert labels == [
        ("llama-ft", "training", "r1", "model", "llama-70b"),
        ("llama-ft", "training", "r1", "team", "nlp"),
    ]


def test_gpu_process_outside_this_pid_namespace_and_simulated_processes(world: tuple) -> None:  # type: ignore[type-arg]
    _, source, sampler, tracker = world
    source.gpu_processes = (
        GpuProcess(999_999, name="ghost"),
        GpuProcess(4_000_002, workload="sim-chat", phase="inference"),
    )
    sampler._status_once(sampler.states[0])
    tracker.scan()
    step(source, sampler, gpu_j=10.0, cpu_j=0.0)
    got = totals(tracker)
    assert got[(("ghost", "unknown", ""), "gpu0")] == pytest.approx(5.0)
    assert got[(("sim-chat", "inference", ""), "gpu0")] == pytest.approx(5.0)
    source.gpu_processes = (GpuProcess(888_888), GpuProcess(101, workload="sim-train", phase="training"))
    sampler._status_once(sampler.states[0])
    tracker.scan()
    step(source, sampler, gpu_j=10.0, cpu_j=0.0)
    got = totals(tracker)
    assert got[(("unresolved", "unknown", ""), "gpu0")] == pytest.approx(5.0)  # no raw pid on a series
    assert got[(("sim-train", "training", ""), "gpu0")] == pytest.approx(5.0)  # not the host's pid 101


def test_a_registration_names_the_process_and_its_children_from_the_next_scan(world: tuple) -> None:  # type: ignore[type-arg]
    proc, source, sampler, tracker = world
    tracker.scan()
    tracker.register(100, WorkloadIdentity("llama-70b-ft", "training", "1234", origin="registration"))
    tracker.register(999, WorkloadIdentity("not-running", "training", "", origin="registration"))
    proc.set_cpu(101, utime=300, stime=0)
    proc.set_total_cpu(1200)
    tracker.scan()
    step(source, sampler, gpu_j=0.0, cpu_j=100.0)
    got = totals(tracker)
    assert got[(("llama-70b-ft", "training", "1234"), "cpu0")] == pytest.approx(100.0)  # worker 101 inherits
    assert not any(key == ("not-running", "training", "") for key, _ in got)
    tracker.unregister(100)
    proc.set_cpu(101, utime=500, stime=0)
    proc.set_total_cpu(1400)
    tracker.scan()
    step(source, sampler, gpu_j=0.0, cpu_j=10.0)
    assert totals(tracker)[(("torchrun", "training", "j7"), "cpu0")] == pytest.approx(10.0)


def test_kernel_threads_are_left_to_system(world: tuple) -> None:  # type: ignore[type-arg]
    proc, source, sampler, tracker = world
    proc.add(2, 0, "kthreadd", "")
    proc.add(300, 2, "kworker/0:1", "", utime=0)
    tracker.scan()
    proc.set_cpu(300, utime=500, stime=0)
    proc.set_total_cpu(2000)
    tracker.scan()
    step(source, sampler, gpu_j=0.0, cpu_j=10.0)
    assert totals(tracker) == {(IDLE, "gpu0"): 0.0, (SYSTEM, "cpu0"): pytest.approx(10.0)}


class CoreZone(ScriptedSource):
    name = "parts"

    def __init__(self) -> None:
        super().__init__()
        self.energy = {"cpu0-core": 0.0}

    def devices(self) -> Sequence[DeviceInfo]:
        return [DeviceInfo("cpu0-core", DeviceKind.CPU, self.name, "Intel", "Xeon", 0, package="0", domain="core")]

    def read_status(self) -> Sequence[DeviceStatus]:
        return []


def test_phase_totals_leave_out_parts_of_a_package(world: tuple) -> None:  # type: ignore[type-arg]
    proc, source, sampler, tracker = world
    core = CoreZone()
    sampler.states.append(SourceState(core))
    sampler.mark_opened(sampler.states[-1])
    sampler._read_once(sampler.states[-1])
    tracker.scan()
    proc.set_cpu(101, utime=1100, stime=0)
    proc.set_total_cpu(2000)
    tracker.scan()
    step(source, sampler, gpu_j=0.0, cpu_j=10.0)
    core.energy["cpu0-core"] += 8.0  # inside the package's 10 J
    sampler._read_once(sampler.states[-1])
    got = totals(tracker)
    assert got[(("torchrun", "training", "j7"), "cpu0-core")] == pytest.approx(8.0)  # split like any domain
    assert tracker.phase_energy_j["training"] == pytest.approx(10.0)  # but counted once, through the package


def test_a_device_taken_over_by_another_source_starts_a_new_baseline(world: tuple) -> None:  # type: ignore[type-arg]
    _, source, sampler, tracker = world
    step(source, sampler, gpu_j=0.0, cpu_j=5.0)
    before = totals(tracker)[(SYSTEM, "cpu0")]
    tracker.on_readings("rapl", [DeviceReading("cpu0", 262_000.0, None, 1, 2)])  # RAPL's counter starts high
    tracker.on_readings("rapl", [DeviceReading("cpu0", 262_003.0, None, 2, 3)])
    assert totals(tracker)[(SYSTEM, "cpu0")] == pytest.approx(before + 3.0)


def test_facts_of_expired_workloads_are_dropped(tmp_path: Path) -> None:
    proc = fake_host(tmp_path / "proc")
    proc.add(100, 1, "trainer", "python3 train.py", environ={"WATTMETER_WORKLOAD": "old-job"})
    source, sampler, tracker = attach(proc, retain_s=0.0)
    tracker.scan()
    proc.set_cpu(100, utime=50, stime=0)
    proc.set_total_cpu(1100)
    tracker.scan()
    step(source, sampler, gpu_j=0.0, cpu_j=10.0)
    assert ("old-job", "unknown", "") in tracker.identities
    time.sleep(0.01)
    series, _ = tracker.snapshot()  # retain_s = 0: the workload's series end at once
    assert all(key != ("old-job", "unknown", "") for key, _, _, _ in series)
    tracker.scan()
    assert ("old-job", "unknown", "") not in tracker.identities


def test_a_process_that_execs_is_resolved_again(tmp_path: Path) -> None:
    proc = fake_host(tmp_path / "proc")
    proc.add(700, 1, "bash", "bash run.sh", starttime=5000)  # a launcher script, about to exec
    source, sampler, tracker = attach(proc)
    tracker.scan()
    proc.set_cpu(700, utime=10, stime=0)
    proc.set_total_cpu(1100)
    tracker.scan()
    step(source, sampler, gpu_j=0.0, cpu_j=10.0)
    assert (("bash", "unknown", ""), "cpu0") in totals(tracker)
    # exec: same pid and start time, a new comm and command line
    proc.add(700, 1, "torchrun", "torchrun --nproc-per-node 8 train.py", utime=20, starttime=5000)
    proc.set_total_cpu(1200)
    tracker.scan()
    step(source, sampler, gpu_j=0.0, cpu_j=10.0)
    assert totals(tracker)[(("torchrun", "training", ""), "cpu0")] == pytest.approx(1.0)  # 10 of 100 ticks


@pytest.mark.parametrize(("utilization", "expected"), [(0.6, "unresolved"), (0.0, "idle")])
def test_a_gpu_whose_processes_cannot_be_listed(world: tuple, utilization: float, expected: str) -> None:  # type: ignore[type-arg]
    _, source, sampler, tracker = world

    def unlisted() -> Sequence[DeviceStatus]:
        return [DeviceStatus("gpu0", utilization_ratio=utilization, processes_listed=False)]

    source.read_status = unlisted  # type: ignore[method-assign]
    sampler._status_once(sampler.states[0])
    tracker.scan()
    step(source, sampler, gpu_j=50.0, cpu_j=0.0)
    got = totals(tracker)
    key = ("unresolved", "unknown", "") if expected == "unresolved" else IDLE
    assert got[(key, "gpu0")] == pytest.approx(50.0)  # a busy GPU's energy is not booked as idle


def test_a_live_workload_idle_past_retain_s_keeps_its_series(tmp_path: Path) -> None:
    proc = fake_host(tmp_path / "proc")
    proc.add(100, 1, "server", "python3 serve.py", environ={"WATTMETER_WORKLOAD": "chat"})
    source, sampler, tracker = attach(proc, retain_s=0.05)
    tracker.scan()
    proc.set_cpu(100, utime=50, stime=0)
    proc.set_total_cpu(1100)
    tracker.scan()
    step(source, sampler, gpu_j=0.0, cpu_j=10.0)
    key = ("chat", "unknown", "")
    for _ in range(3):  # alive, using no CPU, for longer than retain_s
        time.sleep(0.06)
        tracker.scan()
        assert (key, "cpu0") in totals(tracker)
    proc.remove(100)  # ended: now it expires
    tracker.scan()
    time.sleep(0.06)
    assert (key, "cpu0") not in totals(tracker)


# --------------------------------------------------------------------------------------------------------------
# Split now (with split listeners) or at the next flush (without): the same joules


def _program_world(root: Path, listen: bool) -> tuple[FakeProc, ScriptedSource, Sampler, WorkloadTracker, list[float]]:
    proc = fake_host(root)
    proc.add(101, 1, "python", "python train.py", environ={"WATTMETER_WORKLOAD": "trainer"}, utime=100)
    proc.add(200, 1, "vllm", "vllm serve meta-llama/Llama-3.1-8B", utime=50)
    source, sampler, tracker = attach(proc)
    heard: list[float] = []
    if listen:
        tracker.add_split_listener(lambda reading, split, counted: heard.append(sum(split.values())))
    return proc, source, sampler, tracker, heard


_events = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.floats(0, 1000), st.floats(0, 100)),
        st.tuples(st.just("drop"), st.sampled_from(["gpu0", "cpu0"]), st.floats(0, 1)),
        st.tuples(st.just("nan"), st.sampled_from(["gpu0", "cpu0"]), st.just(0.0)),
        st.tuples(st.just("scan"), st.integers(0, 300), st.integers(0, 300)),
        st.tuples(st.just("snapshot"), st.just(0.0), st.just(0.0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(_events)
def test_split_at_flush_gives_what_splitting_each_reading_gives(events: list[tuple[str, object, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        worlds = [_program_world(Path(tmp) / name, listen) for name, listen in (("lazy", False), ("eager", True))]
        ticks = [0, 0, 0]  # trainer, server, host total
        for kind, a, b in events:
            if kind == "scan":
                ticks = [ticks[0] + int(a), ticks[1] + int(b), ticks[2] + int(a) + int(b) + 100]  # type: ignore[call-overload]
            for proc, source, sampler, tracker, _ in worlds:
                if kind == "step":
                    step(source, sampler, gpu_j=float(a), cpu_j=float(b))  # type: ignore[arg-type]
                elif kind == "drop":  # a counter that went backwards: a new baseline
                    source.energy[str(a)] *= float(b)  # type: ignore[arg-type]
                    sampler._read_once(sampler.states[0])
                elif kind == "nan":  # ignored, the baseline stays
                    kept = source.energy[str(a)]
                    source.energy[str(a)] = math.nan
                    sampler._read_once(sampler.states[0])
                    source.energy[str(a)] = kept
                elif kind == "scan":
                    proc.set_cpu(101, utime=100 + ticks[0], stime=0)
                    proc.set_cpu(200, utime=50 + ticks[1], stime=0)
                    proc.set_total_cpu(1000 + ticks[2])
                    source.gpu_processes = (
                        GpuProcess(101, sm_utilization_ratio=0.1 + ticks[0] % 7),
                        GpuProcess(200, sm_utilization_ratio=0.1 + ticks[1] % 5),
                    )
                    sampler._status_once(sampler.states[0])
                    tracker.scan()
                else:
                    tracker.snapshot()
        (lazy, lazy_phases), (eager, eager_phases) = (world[3].snapshot() for world in worlds)
        assert {(k, d): pytest.approx(j, rel=1e-9, abs=1e-9) for k, d, j, _ in eager} == {
            (k, d): j for k, d, j, _ in lazy
        }
        assert eager_phases == pytest.approx(lazy_phases, rel=1e-9, abs=1e-9)
        heard = worlds[1][4]
        assert sum(heard) == pytest.approx(sum(j for _, _, j, _ in eager), rel=1e-9, abs=1e-9)
        for world in worlds:
            world[3].table.close()


def test_without_listeners_readings_are_split_at_the_next_scan_with_the_shares_they_came_under(
    world: tuple,  # type: ignore[type-arg]
) -> None:
    proc, source, sampler, tracker = world
    tracker.scan()
    proc.set_cpu(101, utime=400, stime=0)
    proc.set_total_cpu(2000)
    tracker.scan()  # the trainer has 30% of the CPU from now on
    step(source, sampler, gpu_j=0.0, cpu_j=100.0)
    assert tracker.energy.series_count == 0  # nothing split yet
    proc.set_cpu(101, utime=400, stime=0)  # then it sleeps
    proc.set_total_cpu(3000)
    tracker.scan()  # splits the 100 J by the shares they came under, then sets new ones
    step(source, sampler, gpu_j=0.0, cpu_j=50.0)
    got = totals(tracker)
    assert got[(("torchrun", "training", "j7"), "cpu0")] == pytest.approx(30.0)
    assert got[(SYSTEM, "cpu0")] == pytest.approx(70.0 + 50.0)
