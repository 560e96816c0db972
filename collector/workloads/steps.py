"""Training steps (or work units) per workload, from the steps messages processes send (``collector.client.step``).

Each message's steps are booked under the workload the tracker books the sending process's energy under, so
``wattmeter_workload_steps_total`` and ``wattmeter_workload_energy_joules_total`` share their (workload, phase, job)
and divide in PromQL into joules per step. A message names no workload; it is found by its pid:

- a process that registered: the registration's workload and phase as they stood when the message arrived (steps
  sent before a phase change count under the old phase), with the job the tracker gave that workload (it fills an
  empty job in from ``WATTMETER_JOB``, ``SLURM_JOB_ID`` or the cgroup);
- any other: the tracker's identity for the pid (registration inherited from a parent, environment, rules,
  recognisers, executable).

The tracker learns of a process at its next scan, so steps wait (at most ``unresolved_after_s``) for the pid to
appear in its bindings; a process gone before a scan saw it books its steps under its registration, else under
``workload="unresolved"`` (never a raw pid). Series are bounded like the energy series (``WorkloadEnergy``:
``max_series``, the smallest folded into ``other``; ``retain_s`` after a workload was last seen, a workload whose
processes live on staying).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from collector.attribution import WorkloadEnergy
from collector.config import WorkloadsConfig
from collector.exporters.exposition import Family
from collector.registration import RegistrationEvent, StepsEvent
from collector.workloads.tracker import UNRESOLVED_KEY, WorkloadKey, label_values

STEPS_SERIES = "steps"  # WorkloadEnergy keeps series per (key, device): steps have one per key
MAX_PENDING = 10_000  # pids waiting for the tracker; past it, steps of new pids are booked at once
RESOLVE_INTERVAL_S = 0.5  # how often messages look pending pids up (one bindings() call for all of them)
Bindings = Callable[[], Mapping[int, WorkloadKey]]


class _Pending:
    __slots__ = ("count", "registered", "since_s")

    def __init__(self, registered: WorkloadKey | None, since_s: float) -> None:
        self.count = 0
        self.registered = registered
        self.since_s = since_s


class WorkloadSteps:
    """Cumulative steps per workload key. ``on_steps`` runs on the registration thread, ``families`` on scrapes.

    ``bindings``: pid -> (workload, phase, job) of the processes the tracker identified
    (``WorkloadTracker.process_bindings``)."""

    def __init__(
        self,
        bindings: Bindings,
        max_series: int,
        retain_s: float,
        unresolved_after_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bindings = bindings
        self.unresolved_after_s = unresolved_after_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._totals: WorkloadEnergy[WorkloadKey] = WorkloadEnergy(max_series, retain_s, power_window_s=1.0)
        self._pending: dict[tuple[int, WorkloadKey | None], _Pending] = {}  # (pid, registered key) -> steps
        self._resolved_s = -float("inf")
        self.unresolved = 0
        """Steps booked under ``unresolved``: their process was never identified."""

    @classmethod
    def from_config(cls, config: WorkloadsConfig, bindings: Bindings) -> WorkloadSteps:
        # a running process is identified at the first scan after it used CPU: give it a few scans
        return cls(bindings, config.max_series, config.retain_s, unresolved_after_s=max(5.0, 3 * config.interval_s))

    def on_steps(self, event: StepsEvent) -> None:
        now_s = self._monotonic()
        registered = _registered_key(event.registration)
        with self._lock:
            slot = (event.pid, registered)
            pending = self._pending.get(slot)
            if pending is None:
                if len(self._pending) >= MAX_PENDING:
                    self._book(registered or UNRESOLVED_KEY, event.count, now_s)
                    return
                pending = self._pending[slot] = _Pending(registered, now_s)
            pending.count += event.count
            if now_s - self._resolved_s >= RESOLVE_INTERVAL_S:
                self._resolve_locked(now_s, self.bindings())

    def _snapshot(self) -> list[tuple[tuple[str, str, str], float]]:
        """((workload, phase, job), cumulative steps) per series, pending pids resolved first."""
        now_s = self._monotonic()
        with self._lock:
            bindings = self.bindings()
            self._resolve_locked(now_s, bindings)
            # a workload whose processes live on keeps its series, however long between its steps
            for key in set(bindings.values()):
                self._totals.touch(key, now_s)
            return [(label_values(key), total) for key, _, total, _ in self._totals.snapshot(now_s)]

    def families(self) -> list[Family]:
        rows = sorted(self._snapshot())
        family = Family(
            "wattmeter_workload_steps",
            "counter",
            "Training steps (or work units) processes of a workload reported with collector.client.step(); divide "
            "wattmeter_workload_energy_joules_total by it for joules per step.",
            ("workload", "phase", "job"),
        )
        for labels, total in rows:
            family.add(labels, total)
        return [family]

    def totals(self) -> dict[tuple[str, str, str], int]:
        """Cumulative steps per (workload, phase, job) label values, as ``families`` exports them (pending pids
        resolved first; workloads folded past ``max_series`` under ``other``): what the telemetry stream sends the
        aggregator (``StepSeries``). Safe from any thread."""
        return {key: round(total) for key, total in self._snapshot() if total > 0}

    def _resolve_locked(self, now_s: float, bindings: Mapping[int, WorkloadKey]) -> None:
        self._resolved_s = now_s
        for slot, pending in list(self._pending.items()):
            key = _key(bindings.get(slot[0]), pending.registered)
            if key is None and now_s - pending.since_s < self.unresolved_after_s:
                continue
            del self._pending[slot]
            self._book(key or pending.registered or UNRESOLVED_KEY, pending.count, now_s)

    def _book(self, key: WorkloadKey, count: int, now_s: float) -> None:
        if key == UNRESOLVED_KEY:
            self.unresolved += count
        self._totals.add(key, STEPS_SERIES, float(count), now_s)


def _registered_key(registration: RegistrationEvent | None) -> WorkloadKey | None:
    return None if registration is None else (registration.workload, registration.phase, registration.job)


def _key(bound: WorkloadKey | None, registered: WorkloadKey | None) -> WorkloadKey | None:
    """The key for steps of a process the tracker binds to ``bound``; None while the tracker does not know it (or,
    for a registered process, has not yet applied the registration the steps were sent under)."""
    if bound is None:
        return None
    if registered is None:
        return bound
    workload, phase, job = registered
    if bound[0] != workload:
        return None
    return (workload, phase, job or bound[2])
