"""The identity a process's energy is booked under."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from collector.config import Phase

PHASES: frozenset[str] = frozenset(get_args(Phase))
ORIGINS: tuple[str, ...] = ("registration", "environment", "rule", "recogniser", "executable")


@dataclass(frozen=True)
class WorkloadIdentity:
    """Who a process works for.

    ``workload``, ``phase`` and ``job`` name the energy series (see ``key``); the other fields describe where the
    process runs. ``pod`` holds the Kubernetes pod UID when it comes from the cgroup (names are not in /proc).
    ``origin`` says which resolution step named the workload, one of ``ORIGINS`` (empty: not resolved).
    """

    workload: str
    phase: str  # "training" | "inference" | "unknown"
    job: str = ""
    namespace: str = ""
    pod: str = ""
    container: str = ""
    unit: str = ""
    slurm_job: str = ""
    origin: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # a registered process's own labels, sorted by name

    def key(self) -> tuple[str, str, str]:
        """The energy series identity: (workload, phase, job)."""
        return (self.workload, self.phase, self.job)
