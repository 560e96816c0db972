"""Simulated GPUs and one CPU package for demos and tests: seeded, deterministic, never turned on implicitly.

Each GPU follows a schedule of phases drawn from the seed (idle, then training on odd GPUs and inference on
even ones, with idle gaps), with H100-like power: about 70 W idle, 550-700 W training, 200-450 W inference.
Power is a pure function of (seed, GPU, seconds since start), so a run can be replayed exactly.

A caller that builds the source itself may instead place processes on the GPUs (``load``): each GPU then runs
only those processes and its power follows their SM utilisation (``loaded_power_w``). ``wattmeter demo`` does this
for its synthetic workloads (collector/demo/gpu_load.py); the agent's config never turns it on.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from collector.config import AgentConfig
from collector.counters import PowerIntegrator
from collector.readings import DeviceInfo, DeviceKind, DeviceReading, DeviceStatus, EnergyMethod, GpuProcess
from collector.sources.base import Source, register_source

IDLE_W = 70.0
POWER_LIMIT_W = 700.0
SIM_PID_BASE = 4_000_000  # above the default pid_max (4,194,304 is the kernel's max), so no real pid collides
MEMORY_BYTES = 80 * 1024**3
MAX_PROCESSES_PER_GPU = 1000  # pids SIM_PID_BASE + gpu * 1000 + k: distinct up to 194 GPUs
LOADED_PEAK_W = 680.0  # a fully busy loaded GPU: an H100 under a dense kernel mix, just under its 700 W limit

GpuLoad = Callable[[int], Sequence[GpuProcess]]
"""The processes placed on simulated GPU ``i`` (its position in the source, from 0) now, each with its SM
utilisation (0-1). Real processes of this host (real pids, no ``workload``: the agent resolves them like NVML's)."""


def loaded_power_w(processes: Sequence[GpuProcess], t_s: float, index: int) -> float:
    """Power (W) of a simulated GPU running ``processes``: idle plus the busy range times their summed utilisation
    (capped at 1), with the idle ripple on top."""
    busy = min(1.0, sum(max(0.0, p.sm_utilization_ratio or 0.0) for p in processes))
    return IDLE_W + (LOADED_PEAK_W - IDLE_W) * busy + 2.0 * math.sin(2 * math.pi * t_s / 9.7 + index)


@dataclass(frozen=True)
class Phase:
    start_s: float
    end_s: float
    phase: str  # idle | training | inference


class GpuScenario:
    """The deterministic phase schedule and power curve of one simulated GPU."""

    def __init__(self, seed: int, index: int) -> None:
        self.index = index
        self._rng = random.Random(f"{seed}:{index}")
        self._busy_phase = "training" if index % 2 else "inference"
        self._phases: list[Phase] = []
        self._lock = threading.Lock()  # read() and read_status() run on different threads
        self._extend(0.0)

    def _extend(self, until_s: float) -> None:
        if self._phases and self._phases[-1].end_s > until_s:
            return
        with self._lock:
            self._extend_locked(until_s)

    def _extend_locked(self, until_s: float) -> None:
        start = self._phases[-1].end_s if self._phases else 0.0
        while start <= until_s:
            idle_first = not self._phases or self._phases[-1].phase != "idle"
            if idle_first:
                length = self._rng.uniform(5.0, 15.0) if self._phases else self._rng.uniform(2.0, 6.0)
                self._phases.append(Phase(start, start + length, "idle"))
            else:
                length = self._rng.uniform(40.0, 120.0)
                self._phases.append(Phase(start, start + length, self._busy_phase))
            start = self._phases[-1].end_s

    def phase_at(self, t_s: float) -> Phase:
        self._extend(t_s)
        lo, hi = 0, len(self._phases) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._phases[mid].end_s <= t_s:
                lo = mid + 1
            else:
                hi = mid
        return self._phases[lo]

    def power_w(self, t_s: float) -> float:
        phase = self.phase_at(t_s).phase
        ripple = math.sin(2 * math.pi * t_s / 9.7 + self.index)
        if phase == "training":
            # forward/backward steps show as a fast sawtooth on top of a high plateau
            step = (t_s * 1.3 + self.index * 0.17) % 1.0
            return 600.0 + 60.0 * step + 20.0 * ripple
        if phase == "inference":
            burst = abs(math.sin(2 * math.pi * t_s / 3.3 + self.index))
            return 200.0 + 250.0 * burst + 10.0 * ripple
        return IDLE_W + 2.0 * ripple

    def processes(self, t_s: float, count: int | None = None) -> tuple[GpuProcess, ...]:
        """The processes on this GPU at ``t_s``: by the phase schedule, or ``count`` of them at all times.

        With ``count``, every process belongs to a workload of its own (``sim-worker-<gpu>-<k>``) and holds GPU
        memory all along; while the GPU is busy they share about 95% SM utilisation in the ratio 1 : 2 : ... : count.
        """
        phase = self.phase_at(t_s).phase
        if count is not None:
            busy = phase != "idle"
            weights = count * (count + 1) / 2
            base = SIM_PID_BASE + self.index * MAX_PROCESSES_PER_GPU
            return tuple(
                GpuProcess(
                    base + k,
                    MEMORY_BYTES // (2 * count),
                    0.95 * (k + 1) / weights if busy else 0.0,
                    "python",
                    f"sim-worker-{self.index}-{k}",
                    self._busy_phase,
                    f"sim-job-{self.index}",
                )
                for k in range(count)
            )
        base = SIM_PID_BASE + self.index * 10
        if phase == "training":
            return (
                GpuProcess(
                    base + 1,
                    70 * 1024**3,
                    0.97,
                    "torchrun",
                    f"sim-llama-70b-finetune-{self.index}",
                    "training",
                    f"sim-job-{self.index}",
                ),
            )
        if phase == "inference":
            return (
                GpuProcess(base + 2, 60 * 1024**3, 0.75, "vllm", "sim-llama-8b-chat", "inference", ""),
                GpuProcess(base + 3, 6 * 1024**3, 0.25, "python", "sim-embedder", "inference", ""),
            )
        return ()


class SimulatedSource(Source):
    """Simulated GPUs (``model`` says "Simulated") and optionally one simulated CPU package as ``cpu0``."""

    name = "simulated"

    def __init__(
        self,
        gpus: int,
        interval_s: float = 0.1,
        seed: int = 0,
        cpu: bool = False,
        index_offset: int = 0,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        processes_per_gpu: int | None = None,
        load: GpuLoad | None = None,
    ) -> None:
        """``processes_per_gpu``: None (the default) follows each GPU's phase schedule (0, 1 or 2 processes);
        a number puts that many processes, each its own workload, on every GPU at all times (load tests).
        ``load``: the processes on each GPU come from it instead, and its power follows them (``loaded_power_w``)."""
        if processes_per_gpu is not None and not 1 <= processes_per_gpu < MAX_PROCESSES_PER_GPU:
            raise ValueError(f"processes_per_gpu must be 1 to {MAX_PROCESSES_PER_GPU - 1}, got {processes_per_gpu}")
        self.gpus = gpus
        self.processes_per_gpu = processes_per_gpu
        self.load = load
        self.interval_s = interval_s
        self.slow_interval_s = 1.0
        self.seed = seed
        self.cpu = cpu
        self.index_offset = index_offset
        self._monotonic_ns = monotonic_ns
        self._start_ns = 0
        self._scenarios: list[GpuScenario] = []
        self._integrators: dict[str, PowerIntegrator] = {}
        self._infos: list[DeviceInfo] = []

    def open(self) -> None:
        self._start_ns = self._monotonic_ns()
        self._scenarios = [GpuScenario(self.seed, i) for i in range(self.gpus)]
        self._infos = []
        for i in range(self.gpus):
            index = self.index_offset + i
            self._infos.append(
                DeviceInfo(
                    device_id=f"gpu{index}",
                    kind=DeviceKind.GPU,
                    source=self.name,
                    vendor="NVIDIA",
                    model="Simulated H100 80GB HBM3",
                    index=index,
                    uuid=f"GPU-5157a7ed-0000-4000-8000-{self.seed % 10**6:06d}{i:06d}",
                    method=EnergyMethod.SIMULATED,
                    attributes=(("mig_mode", "disabled"), ("power_scope", "gpu")),
                )
            )
        if self.cpu:
            self._infos.append(
                DeviceInfo(
                    device_id="cpu0",
                    kind=DeviceKind.CPU,
                    source=self.name,
                    vendor="simulated",
                    model="Simulated CPU package",
                    index=0,
                    package="0",
                    domain="package",
                    method=EnergyMethod.SIMULATED,
                )
            )
        self._integrators = {info.device_id: PowerIntegrator() for info in self._infos}

    def devices(self) -> Sequence[DeviceInfo]:
        return list(self._infos)

    def elapsed_s(self, mono_ns: int) -> float:
        return (mono_ns - self._start_ns) / 1e9

    def gpu_power_w(self, i: int, t_s: float) -> float:
        if self.load is not None:
            return loaded_power_w(self.load(i), t_s, i)
        return self._scenarios[i].power_w(t_s)

    def _processes(self, i: int, t_s: float) -> tuple[GpuProcess, ...]:
        if self.load is not None:
            return tuple(self.load(i))
        return self._scenarios[i].processes(t_s, self.processes_per_gpu)

    def cpu_power_w(self, t_s: float, busy_gpus: int | None = None) -> float:
        if busy_gpus is None:
            busy_gpus = sum(1 for s in self._scenarios if s.phase_at(t_s).phase != "idle")
        return 90.0 + 15.0 * busy_gpus + 5.0 * math.sin(2 * math.pi * t_s / 13.0)

    def read(self) -> Sequence[DeviceReading]:
        mono_ns = self._monotonic_ns()
        time_ns = time.time_ns()
        t_s = self.elapsed_s(mono_ns)
        readings = []
        gpu_powers = [self.gpu_power_w(i, t_s) for i in range(len(self._scenarios))]
        busy_gpus = sum(1 for power in gpu_powers if power > IDLE_W + 5.0)
        for i, info in enumerate(self._infos):
            power = gpu_powers[i] if info.kind is DeviceKind.GPU else self.cpu_power_w(t_s, busy_gpus)
            integrator = self._integrators[info.device_id]
            integrator.update(power, mono_ns)
            readings.append(DeviceReading(info.device_id, integrator.total_j, power, mono_ns, time_ns))
        return readings

    def read_status(self) -> Sequence[DeviceStatus]:
        t_s = self.elapsed_s(self._monotonic_ns())
        statuses = []
        for i in range(len(self._scenarios)):
            processes = self._processes(i, t_s)
            busy = sum(p.sm_utilization_ratio or 0.0 for p in processes)
            statuses.append(
                DeviceStatus(
                    device_id=self._infos[i].device_id,
                    power_limit_w=POWER_LIMIT_W,
                    utilization_ratio=min(busy, 1.0),
                    memory_used_bytes=sum(p.used_memory_bytes or 0 for p in processes),
                    temperature_c=35.0 + 0.05 * self.gpu_power_w(i, t_s),
                    sm_clock_hz=1.98e9 if processes else 0.345e9,
                    processes=processes,
                )
            )
        return statuses


@register_source("simulated")
def _build(config: AgentConfig) -> Source | None:
    sim = config.sources.simulated
    if sim.gpus <= 0:
        return None
    return SimulatedSource(sim.gpus, sim.interval_s, sim.seed, sim.cpu)
