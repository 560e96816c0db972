from __future__ import annotations

import pytest

from collector.readings import DeviceKind, EnergyMethod
from collector.sources.simulated import IDLE_W, GpuScenario, SimulatedSource


class FakeClock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


def run(seed: int, seconds: float = 120.0) -> list[tuple[str, float]]:
    clock = FakeClock()
    source = SimulatedSource(gpus=2, interval_s=0.1, seed=seed, cpu=True, monotonic_ns=clock)
    source.open()
    out = []
    for _ in range(int(seconds / 0.1)):
        out.extend((r.device_id, r.energy_j) for r in source.read())
        clock.advance(0.1)
    return out


def test_same_seed_same_run_and_other_seed_differs() -> None:
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_devices_are_marked_simulated() -> None:
    source = SimulatedSource(gpus=3, index_offset=2, cpu=True)
    source.open()
    gpus = [d for d in source.devices() if d.kind is DeviceKind.GPU]
    assert [d.device_id for d in gpus] == ["gpu2", "gpu3", "gpu4"]
    assert all("Simulated" in d.model and d.method is EnergyMethod.SIMULATED for d in source.devices())
    assert [d.device_id for d in source.devices() if d.kind is DeviceKind.CPU] == ["cpu0"]


def test_power_is_h100_like_in_every_phase() -> None:
    scenario = GpuScenario(seed=1, index=1)
    seen = {}
    for step in range(6000):
        t = step * 0.1
        phase = scenario.phase_at(t).phase
        power = scenario.power_w(t)
        seen.setdefault(phase, []).append(power)
        assert 60.0 <= power <= 700.0
    assert set(seen) == {"idle", "training"}
    assert max(seen["idle"]) < IDLE_W + 5
    assert min(seen["training"]) > 550.0
    inference = GpuScenario(seed=1, index=0)
    assert any(inference.phase_at(t * 0.5).phase == "inference" for t in range(400))


def test_energy_is_the_integral_of_power() -> None:
    clock = FakeClock()
    source = SimulatedSource(gpus=1, interval_s=0.01, monotonic_ns=clock)
    source.open()
    expected = 0.0
    last_power = None
    for _ in range(3000):
        (reading,) = source.read()
        if last_power is not None:
            expected += (last_power + reading.power_w) / 2 * 0.01  # type: ignore[operator]
        last_power = reading.power_w
        clock.advance(0.01)
    assert reading.energy_j == pytest.approx(expected)


def test_processes_follow_the_phase() -> None:
    clock = FakeClock()
    source = SimulatedSource(gpus=2, monotonic_ns=clock)
    source.open()
    phases_seen = set()
    for _ in range(300):
        for status in source.read_status():
            for process in status.processes:
                phases_seen.add(process.phase)
                assert process.workload and process.pid >= 4_000_000
        clock.advance(1.0)
    assert phases_seen == {"training", "inference"}


def test_processes_per_gpu_puts_that_many_workloads_on_every_gpu() -> None:
    clock = FakeClock()
    source = SimulatedSource(gpus=8, processes_per_gpu=2, monotonic_ns=clock)
    source.open()
    for _ in range(3):
        statuses = source.read_status()
        processes = [p for status in statuses for p in status.processes]
        assert len(processes) == 16
        assert len({p.pid for p in processes}) == 16
        assert len({p.workload for p in processes}) == 16
        for status in statuses:
            assert status.utilization_ratio is not None and status.utilization_ratio <= 0.95 + 1e-9
            assert all(p.used_memory_bytes for p in status.processes)
        clock.advance(50.0)


def test_default_processes_follow_the_schedule() -> None:
    source = SimulatedSource(gpus=4)
    source.open()
    assert all(len(status.processes) <= 2 for status in source.read_status())


@pytest.mark.parametrize("bad", [0, -1, 1000])
def test_processes_per_gpu_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="processes_per_gpu"):
        SimulatedSource(gpus=1, processes_per_gpu=bad)
