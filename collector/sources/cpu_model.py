"""A labelled estimate of CPU power for hosts without RAPL (VMs, some clouds): not a measurement.

power = idle_watts + watts_per_core * busy cores, where busy cores come from the change in CPU times between
two reads. Every metric from this source carries ``source="model"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from collector.config import AgentConfig
from collector.readings import DeviceInfo, DeviceKind, DeviceReading, EnergyMethod
from collector.sources.base import Source, register_source

CpuTimesFn = Callable[[], Any]


def busy_and_total_s(times: Any) -> tuple[float, float]:
    """Busy and total CPU seconds from a psutil ``cpu_times()`` result (all CPUs summed)."""
    total = float(sum(times))
    idle = float(times.idle) + float(getattr(times, "iowait", 0.0))
    # guest time is already counted in user on Linux; counting it twice would inflate busy time. Steal time is
    # when the hypervisor ran someone else: this VM's CPU was neither busy nor drawing power for it.
    total -= float(getattr(times, "guest", 0.0)) + float(getattr(times, "guest_nice", 0.0))
    total -= float(getattr(times, "steal", 0.0))
    return total - idle, total


class CpuModelSource(Source):
    name = "model"

    def __init__(
        self,
        watts_per_core: float,
        idle_watts: float,
        interval_s: float = 1.0,
        cpu_times: CpuTimesFn = psutil.cpu_times,
        cpu_count: int | None = None,
    ) -> None:
        self.watts_per_core = watts_per_core
        self.idle_watts = idle_watts
        self.interval_s = interval_s
        self._cpu_times = cpu_times
        self._cpu_count = cpu_count or psutil.cpu_count() or 1
        self._energy_j = 0.0
        self._last: tuple[float, float] | None = None
        self._info = DeviceInfo(
            device_id="cpu0",
            kind=DeviceKind.CPU,
            source=self.name,
            vendor="estimate",
            model=f"CPU model ({self._cpu_count} cores, {watts_per_core:g} W/core, {idle_watts:g} W idle)",
            index=0,
            package="0",
            domain="package",
            method=EnergyMethod.MODEL,
        )

    def open(self) -> None:
        self._last = busy_and_total_s(self._cpu_times())

    def devices(self) -> Sequence[DeviceInfo]:
        return [self._info]

    def power_w(self, busy_s: float, total_s: float) -> float:
        utilization = 0.0 if total_s <= 0 else min(max(busy_s / total_s, 0.0), 1.0)
        return self.idle_watts + self.watts_per_core * self._cpu_count * utilization

    def read(self) -> Sequence[DeviceReading]:
        mono_ns = time.monotonic_ns()
        busy, total = busy_and_total_s(self._cpu_times())
        last_busy, last_total = self._last if self._last is not None else (busy, total)
        self._last = (busy, total)
        # CPU times are cumulative, so the power found is the average over exactly the elapsed CPU time:
        # energy is that power times the wall time the CPU times cover.
        power = self.power_w(busy - last_busy, total - last_total)
        self._energy_j += power * max(total - last_total, 0.0) / self._cpu_count
        return [DeviceReading("cpu0", self._energy_j, power, mono_ns, time.time_ns())]


@register_source("cpu_model")
def _build(config: AgentConfig) -> Source | None:
    model = config.sources.cpu_model
    if model.enabled is False:
        return None
    # enabled = "auto" is resolved by the agent once it knows whether RAPL is readable.
    return CpuModelSource(model.watts_per_core, model.idle_watts, model.interval_s)
