"""What sources produce: static device descriptions and timestamped energy readings.

Units: energy in joules, power in watts, times in nanoseconds (``mono_ns`` from ``time.monotonic_ns`` for
intervals, ``time_ns`` as Unix epoch nanoseconds for the wire).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple


class DeviceKind(str, Enum):
    GPU = "gpu"
    CPU = "cpu"
    DRAM = "dram"


class EnergyMethod(str, Enum):
    COUNTER = "counter"  # a hardware energy counter (NVML total energy, RAPL energy_uj)
    INTEGRATED = "integrated"  # power samples integrated by the agent (trapezoid)
    MODEL = "model"  # an estimate from utilisation, not a measurement
    SIMULATED = "simulated"  # the simulated source; never real hardware


@dataclass(frozen=True)
class DeviceInfo:
    """Static description of one measured device.

    ``device_id`` is the host-unique id used on the wire and in workload metrics: ``gpu0``, ``cpu0``, ``dram0``.
    For CPU domains ``package`` and ``domain`` name the RAPL zone (``domain`` is package, core, uncore, dram, psys).
    """

    device_id: str
    kind: DeviceKind
    source: str
    vendor: str
    model: str
    index: int
    uuid: str = ""
    package: str = ""
    domain: str = ""
    method: EnergyMethod = EnergyMethod.COUNTER
    attributes: tuple[tuple[str, str], ...] = ()


class DeviceReading(NamedTuple):
    """One reading of one device: a cumulative energy that never goes backwards, and the power now.

    ``energy_j`` is monotonic for the life of the agent (wraps and counter resets are already folded in).
    ``power_w`` is None when the device reports no power for this read. A NamedTuple: tens of these are made
    every 100 ms, and a tuple is several times cheaper to build than a frozen dataclass.
    """

    device_id: str
    energy_j: float
    power_w: float | None
    mono_ns: int
    time_ns: int


@dataclass(frozen=True)
class GpuProcess:
    """A process using a GPU, as NVML (or the simulation) reports it."""

    pid: int
    used_memory_bytes: int | None = None
    sm_utilization_ratio: float | None = None
    name: str = ""
    workload: str = ""
    phase: str = ""
    job: str = ""


@dataclass(frozen=True)
class DeviceStatus:
    """Slow-changing state of a device, read at ``slow_interval_s``; every field is optional."""

    device_id: str
    power_limit_w: float | None = None
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    temperature_c: float | None = None
    sm_clock_hz: float | None = None
    module_power_w: float | None = None
    processes: tuple[GpuProcess, ...] = field(default=())
    processes_listed: bool = True  # False when the driver would not list them (no permission, not supported)
