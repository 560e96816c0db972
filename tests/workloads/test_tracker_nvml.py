"""The NVML source (over the libnvidia-ml stand-in) feeding the tracker: real GPU processes found in a fake /proc
are named, their energy split by SM utilisation, and the split adds up to the GPU's energy counter."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.attribution import IDLE
from collector.config import WorkloadsConfig
from collector.sampler import Sampler
from collector.sources.nvml import NvmlSource
from collector.workloads.tracker import WorkloadTracker
from tests.fakes.fake_nvml import FakeGpu, FakeNvmlLibrary, FakeProcess, FakeUtilSample, installed
from tests.fakes.proc import FakeProc


def test_nvml_processes_are_attributed_and_add_up(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path / "proc")
    proc.set_total_cpu(1000)
    proc.add(1, 0, "systemd", "/sbin/init")
    proc.add(500, 1, "python3", "python3 -m vllm.entrypoints.openai.api_server --model /models/Llama-3.1-8B")
    proc.add(600, 1, "python3", "python3 train.py", environ={"WATTMETER_WORKLOAD": "ft", "WATTMETER_PHASE": "training"})
    gpu = FakeGpu(
        "GPU-1111",
        name="NVIDIA H100 80GB HBM3",
        energy_mj=5_000_000,
        processes=[FakeProcess(500, used_memory_bytes=40 << 30), FakeProcess(600, used_memory_bytes=20 << 30)],
        util_samples=[
            FakeUtilSample(500, timestamp_us=10, sm_util=60),
            FakeUtilSample(600, timestamp_us=11, sm_util=20),
        ],
    )
    lib = FakeNvmlLibrary([gpu])
    with installed(lib):
        source = NvmlSource(interval_s=0.1)
        source.open()
        sampler = Sampler([source])
        state = sampler.states[0]
        sampler.mark_opened(state)
        tracker = WorkloadTracker(WorkloadsConfig(proc_root=proc.root), sampler)
        sampler.add_listener(tracker.on_readings)
        sampler._read_once(state)  # baseline: 5,000 J since driver load
        sampler._status_once(state)
        tracker.scan()
        gpu.energy_mj += 800_000  # 800 J while both ran
        sampler._read_once(state)
        gpu.processes = []
        sampler._status_once(state)
        tracker.scan()
        gpu.energy_mj += 70_000  # 70 J idle
        sampler._read_once(state)

    series, phases = tracker.snapshot()
    got = {(key, device): joules for key, device, joules, _ in series}
    assert got[(("Llama-3.1-8B", "inference", ""), "gpu0")] == pytest.approx(800.0 * 0.75)
    assert got[(("ft", "training", ""), "gpu0")] == pytest.approx(800.0 * 0.25)
    assert got[(IDLE, "gpu0")] == pytest.approx(70.0)
    assert sum(j for (_, d), j in got.items() if d == "gpu0") == pytest.approx(870.0, rel=1e-12)
    assert phases == {"inference": pytest.approx(600.0), "training": pytest.approx(200.0)}
