"""Which workload used each device's energy: process scans set the shares, every reading is split by them.

A scan (every ``[workloads] interval_s``) reads the process table, resolves the processes that used CPU time
since the last scan (and those on each GPU) to workload identities, and sets each device's shares; the device
energy between two scans is split with those shares: each reading as it arrives when split listeners want every
split (the stream, carbon pricing), otherwise what the device used since its last split, at the next scan or
snapshot (the same joules: the shares hold between scans). Either way workload energy is exact to the device's
latest reading. Per device, the workloads plus ``idle`` (GPUs) or ``system`` (CPU, DRAM) add up to the device's
energy.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from collector.attribution import DeviceSplitter, ProcessShare, SpecialKey, WorkloadEnergy
from collector.config import WorkloadsConfig
from collector.errors import SourceUnavailable
from collector.readings import DeviceKind, DeviceReading, GpuProcess
from collector.sampler import Sampler, run_every
from collector.workloads.identity import WorkloadIdentity
from collector.workloads.procfs import ProcessSample, ProcessTable
from collector.workloads.resolve import Resolver

log = logging.getLogger(__name__)

WorkloadKey = tuple[str, str, str]  # (workload, phase, job): one energy series per device
MIN_POWER_WINDOW_S = 1.0
KTHREADD_PID = 2  # the parent of every kernel thread
UNRESOLVED_WORKLOAD = "unresolved"
UNRESOLVED_KEY = (UNRESOLVED_WORKLOAD, "unknown", "")
MAX_PENDING_REGISTRATIONS = 10_000
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def read_total_cpu_ticks(proc_root: Path) -> int:
    """All CPUs' time in clock ticks from ``<proc_root>/stat`` (guest time is inside user already)."""
    with open(proc_root / "stat", "rb") as handle:
        fields = handle.readline().split()
    if not fields or fields[0] != b"cpu":
        raise ValueError(f"{proc_root / 'stat'}: no aggregate cpu line")
    return sum(int(value) for value in fields[1:9])  # user .. steal


SplitListener = Callable[[DeviceReading, Mapping[WorkloadKey | SpecialKey, float], bool], None]


class WorkloadTracker:
    """Owns the process table, the resolver, the device splitter and the exported accumulators."""

    def __init__(self, config: WorkloadsConfig, sampler: Sampler) -> None:
        self.config = config
        self.sampler = sampler
        self.table = ProcessTable(config.proc_root)
        self.resolver = Resolver(config.rules)
        self.splitter: DeviceSplitter[WorkloadKey] = DeviceSplitter()
        # power is the energy added over a window; it must hold at least two reads of the slowest source, and a
        # scan interval: without split listeners, energy is split at scans (and scrapes), so one increment may
        # cover a whole interval
        slowest_s = max((state.source.interval_s for state in sampler.states), default=0.0)
        window_s = max(MIN_POWER_WINDOW_S, 2 * slowest_s, config.interval_s)
        self.energy: WorkloadEnergy[WorkloadKey] = WorkloadEnergy(config.max_series, config.retain_s, window_s)
        self.phase_energy_j: dict[str, float] = {}
        self.identities: dict[WorkloadKey, WorkloadIdentity] = {}
        self.errors = 0
        self.up = False
        self.scan_durations_s: list[float] = []
        self._lock = threading.Lock()  # splitter and accumulators: source threads add, the scan thread sets shares
        self._pending: list[tuple[int, WorkloadIdentity | None]] = []  # registrations, applied at the next scan
        self._previous: dict[int, ProcessSample] = {}  # the last scan: ticks since then are this scan's window
        self._previous_uptime_ticks: int | None = None
        self._previous_table_scan = -1  # the table's scan count when ``_previous`` was taken
        self._device_source: dict[str, str] = {}
        self._phase_counted: dict[str, bool] = {}
        self._total_ticks: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._split_listeners: list[SplitListener] = []
        # device id -> its latest reading not split yet, and when it came (monotonic seconds)
        self._unsplit: dict[str, tuple[DeviceReading, float]] = {}
        self._split_at_s: dict[str, float] = {}  # device id -> when its energy was last split (monotonic s)

    @property
    def errors_total(self) -> int:
        return self.errors + self.table.errors

    def start(self) -> None:
        self.sampler.add_listener(self.on_readings)
        self._thread = threading.Thread(target=self._loop, name="workloads", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        try:
            run_every(self.config.interval_s, self._scan_once, self._stop)
        finally:
            self.table.close()  # the stat files it keeps open

    def _scan_once(self) -> None:
        try:
            self.scan()
            self.up = True
        except SourceUnavailable as exc:
            self.up = False
            self.errors += 1
            log.error("workload scan: %s", exc)
        except Exception:
            self.up = False
            self.errors += 1
            log.exception("workload scan failed")

    # --- readings: split as they arrive, or at the next flush ------------------------------------------------------

    def add_split_listener(self, listener: SplitListener) -> None:
        """Call ``listener(reading, joules_by_key, in_host_total)`` with every reading's split (the joules each key
        used since the device's previous reading; ``in_host_total``: whether the device counts in host totals,
        False for parts of a package and for psys). Runs on the source's thread under the tracker's lock: be quick."""
        with self._lock:
            self._flush_locked()  # from now on each reading is split as it comes
            self._split_listeners.append(listener)

    def on_readings(self, source_name: str, readings: Sequence[DeviceReading]) -> None:
        """Take in a source's readings. With split listeners, each is split now; without, only the device's latest
        reading is kept, and what the device used since its last split is split at the next flush (a scan, a
        snapshot): the shares hold between scans, so one split of the sum is the sum of the splits, for a fraction
        of the work at 10 Hz. A reading that is the device's first, or lower than the one before it, is split
        at once (a baseline), as is whatever was pending before it."""
        with self._lock:
            if self._split_listeners:
                now_s = time.monotonic()
                for reading in readings:
                    if self._device_source.get(reading.device_id) != source_name:
                        self._declare(source_name, reading.device_id)
                    self._split(reading, now_s)
                return
            unsplit = self._unsplit
            arrived_s = time.monotonic()
            for reading in readings:
                device_id = reading.device_id
                if self._device_source.get(device_id) != source_name:
                    self._declare(source_name, device_id)
                energy_j = reading.energy_j
                if not math.isfinite(energy_j):
                    continue  # ignored, as the splitter would
                pending = unsplit.get(device_id)
                floor_j = pending[0].energy_j if pending is not None else self.splitter.baseline_j(device_id)
                if floor_j is not None and energy_j >= floor_j:
                    unsplit[device_id] = (reading, arrived_s)
                    continue
                if pending is not None:
                    self._split(*unsplit.pop(device_id))
                self._split(reading, arrived_s)

    def flush(self) -> None:
        """Split what every device used up to its latest reading (see ``on_readings``)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        unsplit, self._unsplit = self._unsplit, {}
        for reading, arrived_s in unsplit.values():
            self._split(reading, arrived_s)

    def _split(self, reading: DeviceReading, now_s: float) -> None:
        """Split what the device used since its last split reading and add it up, as used over the time since
        that split up to ``now_s``, when the reading came (monotonic seconds; the tracker's lock held)."""
        device_id = reading.device_id
        split = self.splitter.on_reading(reading)
        if not split:
            if math.isfinite(reading.energy_j):  # a baseline; an ignored reading leaves the last one as it was
                self._split_at_s[device_id] = now_s
            return
        self.energy.add_many(device_id, split, now_s, self._split_at_s.get(device_id))
        self._split_at_s[device_id] = now_s
        counted = self._phase_counted[device_id]
        for listener in self._split_listeners:
            listener(reading, split, counted)
        if not counted:
            return
        phase_energy_j = self.phase_energy_j
        for key, joules in split.items():
            if not isinstance(key, SpecialKey):
                phase = key[1]
                phase_energy_j[phase] = phase_energy_j.get(phase, 0.0) + joules

    def _declare(self, source_name: str, device_id: str) -> None:
        """First reading of a device from this source: declare it, and whether it counts in phase totals."""
        info = next(
            (i for st in self.sampler.states if st.name == source_name for i in st.devices if i.device_id == device_id),
            None,
        )
        kind = info.kind if info is not None else DeviceKind.GPU
        if self._device_source.get(device_id) not in (None, source_name):
            pending = self._unsplit.pop(device_id, None)
            if pending is not None:  # what the old source's readings said the device used stays counted
                self._split(*pending)
            self.splitter.rebase(device_id)  # another source took the device over (RAPL after the estimate)
            self._split_at_s.pop(device_id, None)
        else:
            self.splitter.add_device(device_id, kind)
        self._device_source[device_id] = source_name
        # phase totals add devices up: leave out the parts of a package (core, uncore) and the whole platform (psys)
        self._phase_counted[device_id] = info is None or kind is not DeviceKind.CPU or info.domain == "package"

    # --- scans: set the shares ---------------------------------------------------------------------------------

    def register(self, pid: int, identity: WorkloadIdentity) -> None:
        """A process said who it is (over the registration socket); takes effect at the next scan."""
        self._queue(pid, identity)

    def unregister(self, pid: int) -> None:
        self._queue(pid, None)

    def _queue(self, pid: int, identity: WorkloadIdentity | None) -> None:
        with self._lock:
            if len(self._pending) >= MAX_PENDING_REGISTRATIONS:  # a flood between two scans: keep memory bounded
                self.errors += 1
                return
            self._pending.append((pid, identity))

    def _apply_registrations(self, snapshot: dict[int, ProcessSample]) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for pid, identity in pending:
            if identity is None:
                self.resolver.drop_registration(pid)
            elif pid in snapshot:  # tied to this process's start time, so a reused pid does not inherit it
                self.resolver.set_registration(pid, snapshot[pid].starttime, identity)

    def scan(self) -> None:
        started = time.perf_counter()
        with self._lock:
            self._flush_locked()  # with the shares of the scan before
            live = self.energy.keys()
        # facts of workloads whose series expired go too; first, so what this scan resolves stays until its
        # series exist (only this thread writes identities; the exporter reads single keys)
        for key in [key for key in self.identities if key not in live]:
            del self.identities[key]
        snapshot = self.table.scan()
        self._apply_registrations(snapshot)
        self.resolver.prune(snapshot)
        total = read_total_cpu_ticks(self.config.proc_root)
        ticks_by_key = self._cpu_ticks_by_key(snapshot)
        last_total, self._total_ticks = self._total_ticks, total
        gpu_shares = self._gpu_shares(snapshot)
        with self._lock:
            self._flush_locked()  # readings that came during the scan go by the old shares too
            if last_total is not None and ticks_by_key is not None:
                for state in self.sampler.states:
                    for info in state.devices:
                        if info.kind is not DeviceKind.GPU:
                            self.splitter.set_cpu_shares(info.device_id, ticks_by_key, total - last_total)
            for device_id, shares in gpu_shares.items():
                self.splitter.set_gpu_shares(device_id, shares)
            # a workload whose processes live on, idle since, keeps its series past retain_s (no counter reset)
            now_s = time.monotonic()
            for identity in self.resolver.live_identities():
                self.energy.touch(identity.key(), now_s)
            for shares in gpu_shares.values():
                for share in shares:
                    self.energy.touch(share.key, now_s)
        self.scan_durations_s.append(time.perf_counter() - started)
        del self.scan_durations_s[:-100]

    def _identity(self, pid: int, snapshot: dict[int, ProcessSample]) -> WorkloadIdentity:
        identity = self.resolver.resolve(pid, snapshot, self.table.static)
        self.identities[identity.key()] = identity
        return identity

    def _cpu_ticks_by_key(self, snapshot: dict[int, ProcessSample]) -> dict[WorkloadKey, float] | None:
        """CPU ticks per workload since the last scan; None at the first scan (no window yet)."""
        previous = self._previous
        first = not previous
        started_after = self._previous_uptime_ticks
        self._previous_uptime_ticks = uptime_ticks(self.config.proc_root)
        by_key: dict[WorkloadKey, float] = {}
        if self.table.scans == self._previous_table_scan + 1:
            # the table names the samples that changed since the scan ``previous`` came from: only those ran
            candidates: Iterable[int] = self.table.changed_pids
        else:
            candidates = snapshot
        self._previous_table_scan = self.table.scans
        for pid in candidates:
            sample = snapshot[pid]
            if pid == KTHREADD_PID or sample.ppid == KTHREADD_PID:
                continue  # kernel threads: their time is the kernel's, left to `system`
            before = previous.get(pid)
            if before is sample:  # the table hands back the same sample when its stat did not change: no ticks
                continue
            if before is not None and before.starttime == sample.starttime:
                used = sample.cpu_ticks - before.cpu_ticks
            elif first or (started_after is not None and sample.starttime < started_after):
                # not seen at the last scan but older than it (a read that failed then): its lifetime of ticks
                # is not this window's
                used = 0
            else:  # started inside the window: all its ticks are
                used = sample.cpu_ticks
            if used > 0:  # resolving only the processes that ran keeps a host of sleeping processes cheap
                key = self._identity(pid, snapshot).key()
                by_key[key] = by_key.get(key, 0.0) + used
        self._previous = snapshot
        return None if first else by_key

    def _gpu_shares(self, snapshot: dict[int, ProcessSample]) -> dict[str, list[ProcessShare[WorkloadKey]]]:
        shares: dict[str, list[ProcessShare[WorkloadKey]]] = {}
        for state in self.sampler.states:
            for device_id, status in state.statuses.items():
                if not status.processes_listed:
                    # the driver would not say who runs there: a busy GPU's energy is nobody's idle
                    busy = (status.utilization_ratio or 0.0) > 0.0
                    shares[device_id] = [ProcessShare(UNRESOLVED_KEY)] if busy else []
                    if busy:
                        self.identities[UNRESOLVED_KEY] = WorkloadIdentity(UNRESOLVED_WORKLOAD, "unknown")
                    continue
                shares[device_id] = [
                    ProcessShare(
                        self._gpu_process_key(process, snapshot),
                        process.sm_utilization_ratio,
                        process.used_memory_bytes,
                    )
                    for process in status.processes
                ]
        return shares

    def _gpu_process_key(self, process: GpuProcess, snapshot: dict[int, ProcessSample]) -> WorkloadKey:
        if process.workload:  # the simulated source names its own processes; their pids are not this host's
            identity = WorkloadIdentity(process.workload, process.phase or "unknown", process.job, origin="source")
        elif process.pid in snapshot:
            return self._identity(process.pid, snapshot).key()
        else:
            # gone since the scan listed /proc, or in another pid namespace (the agent without hostPID): never a
            # raw pid on an energy series, which would make one series per process
            identity = WorkloadIdentity(process.name or UNRESOLVED_WORKLOAD, "unknown", origin="executable")
        self.identities[identity.key()] = identity
        return identity.key()

    # --- export ---------------------------------------------------------------------------------------------------

    def snapshot(self) -> tuple[list[tuple[WorkloadKey | SpecialKey, str, float, float]], dict[str, float]]:
        with self._lock:
            self._flush_locked()
            series = self.energy.snapshot(time.monotonic())
            phases = dict(self.phase_energy_j)
        return series, phases

    def process_bindings(self) -> dict[int, WorkloadKey]:
        """pid -> (workload, phase, job) of the live processes the scans identified (resolved from /proc, or named
        by their source), so a request span that names only a pid finds its workload. Safe from any thread."""
        bindings = {pid: identity.key() for pid, identity in self.resolver.identities_by_pid().items()}
        for state in self.sampler.states:
            for status in list(state.statuses.values()):
                for process in status.processes:
                    if process.workload:
                        bindings[process.pid] = (process.workload, process.phase or "unknown", process.job)
        return bindings


def label_values(key: WorkloadKey | SpecialKey) -> tuple[str, str, str]:
    """(workload, phase, job) label values of a series key. ``system`` and ``other`` carry ``phase=""``, which no
    workload has (training, inference or unknown), so a workload someone names ``system`` is never merged in."""
    if isinstance(key, SpecialKey):
        return (str(key), "", "")
    return key


def uptime_ticks(proc_root: Path) -> int | None:
    """Seconds since boot from ``<proc_root>/uptime``, in clock ticks (the unit of a process's starttime)."""
    try:
        with open(proc_root / "uptime", "rb") as handle:
            return int(float(handle.read().split()[0]) * CLOCK_TICKS_PER_S)
    except (OSError, ValueError, IndexError):
        return None
