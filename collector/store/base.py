"""The aggregator's storage interface: what ingest writes and what the HTTP API and reports read.

Ingest (collector.aggregator) validates a batch, works out its rollup increments and hands the store one
``StoredBatch``; the store writes it in one transaction, deduplicated by (agent instance, sequence), and only then
is the batch acknowledged. SQLite (one process, the default) and PostgreSQL (several aggregators on one database)
implement the same ``Store``.

Energy values in raw chunks are the agent instance's cumulative counters: they never go backwards within an
instance, but start anywhere (a device counter may start at the hardware's own value, a workload's at 0). Readers
that want one continuous counter per (host, device) across agent restarts use ``continuous_energy``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from collector.errors import WattmeterError
from collector.store.rows import PackedBatch

Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


class StoreError(WattmeterError):
    """The store cannot be opened or used (bad URL, unreadable file, server unreachable); the message says how to
    fix it. A write that raised it is not known to be stored: do not acknowledge the batch (its replay is deduplicated).
    """


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    machine_id: str = ""
    boot_id: str = ""


@dataclass(frozen=True)
class DeviceChunk:
    """One device's samples from one batch, time ascending (Unix ns)."""

    device_id: str
    kind: str  # gpu | cpu | dram
    source: str
    in_host_total: bool
    time_ns: Int64Array
    energy_j: Float64Array  # the agent instance's cumulative counter
    power_w: Float64Array | None  # NaN where the device gave none; None: no power at all in this chunk


@dataclass(frozen=True)
class WorkloadChunk:
    """One workload's cumulative energy on one device from one batch, time ascending."""

    workload: str
    phase: str
    job: str
    device_id: str
    time_ns: Int64Array
    energy_j: Float64Array


@dataclass(frozen=True)
class RollupIncrement:
    """Joules to add to one 1-minute bucket. ``workload == phase == job == ""`` with ``special == ""``: the device's
    own energy; otherwise one workload's (``special`` names idle/system/other, whose ``workload`` is the same)."""

    minute_ns: int  # start of the minute, Unix ns, a multiple of 60e9
    device_id: str
    workload: str
    phase: str
    job: str
    energy_j: float


@dataclass(frozen=True)
class StoredBatch:
    instance_id: str
    sequence: int
    oldest_pending_sequence: int  # the agent holds nothing below this: contiguity may jump to it
    host: HostInfo
    received_ns: int
    devices: Sequence[DeviceChunk] = ()
    workloads: Sequence[WorkloadChunk] = ()
    rollups: Sequence[RollupIncrement] = ()
    raw_bytes: int = 0  # size on the wire, for accounting
    # the same content already packed as rows (ingest packs in its worker processes); devices, workloads and rollups
    # are then empty
    packed: PackedBatch | None = None

    def __post_init__(self) -> None:
        if self.packed is not None and (self.devices or self.workloads or self.rollups):
            raise ValueError("a StoredBatch has either chunks and rollups or packed rows, not both")


@dataclass(frozen=True)
class WriteResult:
    stored: bool  # False: a duplicate (already stored), nothing written
    acked_sequence: int  # highest contiguous sequence stored for the instance, after this write


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    kind: str
    source: str
    in_host_total: bool
    last_seen_ns: int


@dataclass(frozen=True)
class HostRow:
    hostname: str
    machine_id: str
    boot_id: str
    first_seen_ns: int
    last_seen_ns: int
    devices: list[DeviceRow] = field(default_factory=list)


@dataclass(frozen=True)
class WorkloadEnergyRow:
    """Energy of one workload on one host over a window, from the 1-minute rollups."""

    hostname: str
    workload: str
    phase: str
    job: str
    energy_j: float  # over devices with in_host_total
    by_device_j: dict[str, float]  # every device, parts of packages included


@dataclass(frozen=True)
class LastSample:
    time_ns: int
    energy_j: float


class Store(abc.ABC):
    """Storage behind the aggregator. Methods may be called from several threads; each call is one transaction."""

    @abc.abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema to the latest version; returns that version. Safe to call every start."""

    @abc.abstractmethod
    def write_batch(self, batch: StoredBatch) -> WriteResult:
        """Store ``batch`` durably (committed, and synced where the backend allows) in one transaction, unless
        (instance, sequence) is already stored. Updates the instance's contiguous watermark."""

    def write_batches(self, batches: Sequence[StoredBatch]) -> list[WriteResult]:
        """``write_batch`` of each of ``batches``, in order; one result each. Backends write them in one
        transaction (group commit: one sync for all); this default writes them one by one. When it raises, which of
        them were stored is not known: write them again (each alone, to find the one that fails), which dedup makes
        safe. Two batches of one instance, even the same (instance, sequence) twice, may be in one call."""
        return [self.write_batch(batch) for batch in batches]

    @abc.abstractmethod
    def acked_sequence(self, instance_id: str) -> int:
        """Highest contiguous sequence stored for ``instance_id``; 0 when none."""

    @abc.abstractmethod
    def last_sample(
        self, instance_id: str, device_id: str, workload: tuple[str, str, str] | None = None
    ) -> LastSample | None:
        """The last stored sample of a device series (``workload`` None) or of a workload series on that device, for
        ``instance_id``; None when there is none. Ingest uses it after a restart to check counters never go back."""

    @abc.abstractmethod
    def hosts(self) -> list[HostRow]:
        """Every host seen, with its devices."""

    @abc.abstractmethod
    def workload_energy(self, since_ns: int, until_ns: int, phase: str | None = None) -> list[WorkloadEnergyRow]:
        """Per (host, workload, phase, job): joules in the rollup minutes starting in [since_ns, until_ns)."""

    @abc.abstractmethod
    def device_samples(
        self, hostname: str, device_id: str, since_ns: int, until_ns: int
    ) -> list[tuple[int, float, float | None]]:
        """Raw samples ``(t_ns, energy_j, power_w)`` of one device with since_ns <= t_ns < until_ns, time ascending,
        energy continuous across agent restarts (``continuous_energy``), power None where there was none."""

    @abc.abstractmethod
    def workload_samples(
        self, hostname: str, workload: tuple[str, str, str], device_id: str, since_ns: int, until_ns: int
    ) -> list[tuple[int, float]]:
        """Raw samples ``(t_ns, energy_j)`` of one workload on one device, like ``device_samples``."""

    @abc.abstractmethod
    def prune(self, now_ns: int, raw_retention_s: float, rollup_retention_s: float) -> int:
        """Delete raw chunks older than ``raw_retention_s`` and rollups older than ``rollup_retention_s``; returns
        the number of rows deleted."""

    @abc.abstractmethod
    def close(self) -> None: ...


def continuous_energy(chunks: Iterable[tuple[str, Int64Array, Float64Array]]) -> tuple[Int64Array, Float64Array]:
    """Join (instance id, time_ns, cumulative energy_j) chunks, in time order, into one counter that never resets.

    When the instance changes, the new one's first sample continues from the previous one's last (the energy
    between the old agent's last sample and the new one's first was not measured, so it counts as none).
    """
    times: list[Int64Array] = []
    energies: list[Float64Array] = []
    offset = 0.0
    previous_instance: str | None = None
    last = 0.0
    for instance_id, time_ns, energy_j in chunks:
        if len(time_ns) == 0:
            continue
        if previous_instance is None:
            offset = 0.0
        elif instance_id != previous_instance:
            offset = last - float(energy_j[0])
        previous_instance = instance_id
        shifted = energy_j + offset
        times.append(time_ns)
        energies.append(shifted)
        last = float(shifted[-1])
    if not times:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    return np.concatenate(times), np.concatenate(energies)
