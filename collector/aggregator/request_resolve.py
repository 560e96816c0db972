"""Which workload served a request span, on the span's host, in issue 5's order:

1. the span's explicit workload name (the client's ``workload=`` argument, OTLP ``wattmeter.workload``);
2. its pid through the host's process bindings (``Batch.processes``) at the span's time: the binding of that pid
   seen last at or before the span's end, else the first one seen after it (an agent reports a process's binding
   with its next batch after the scan that found it, so a request early in a process's life comes before it);
3. its ``service_name`` against the names of the workloads that have energy on the host (exactly, else the one
   name equal to it ignoring case).

A workload is its name: every (workload, phase, job) identity of that name on the host counts (a registered
process that switches phase keeps serving the same requests).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from collector.store.base import ProcessBindingRow


@dataclass
class HostBindings:
    """One host's pid -> workload bindings: per pid, (seen_ns, workload name) in seen order."""

    by_pid: dict[int, list[tuple[int, str]]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Iterable[ProcessBindingRow]) -> HostBindings:
        by_pid: dict[int, list[tuple[int, str]]] = {}
        for row in rows:
            by_pid.setdefault(row.pid, []).append((row.seen_ns, row.workload))
        for seen in by_pid.values():
            seen.sort()
        return cls(by_pid)

    def workload_at(self, pid: int, time_ns: int) -> str | None:
        seen = self.by_pid.get(pid)
        if not seen:
            return None
        after = bisect.bisect_right(seen, (time_ns, "\U0010ffff"))
        return seen[after - 1][1] if after else seen[0][1]


@dataclass(frozen=True)
class HostWorkloads:
    """What resolution needs of one host: its bindings and the names of its workloads."""

    bindings: HostBindings
    names: frozenset[str]

    def resolve(self, workload: str, pid: int, service_name: str, end_ns: int) -> str | None:
        """The workload name of a span (on this host) with those fields; None when nothing names one (yet)."""
        if workload:
            return workload
        if pid:
            bound = self.bindings.workload_at(pid, end_ns)
            if bound is not None:
                return bound
        if service_name:
            return self.by_service(service_name)
        return None

    def resolve_all(
        self, workload: Sequence[str], pid: Sequence[int], service_name: Sequence[str], end_ns: Sequence[int]
    ) -> list[str | None]:
        """``resolve`` of spans given as columns."""
        if all(workload):  # the usual case: every span names its workload
            return list(workload)
        return [self.resolve(*span) for span in zip(workload, pid, service_name, end_ns, strict=True)]

    def by_service(self, service_name: str) -> str | None:
        if service_name in self.names:
            return service_name
        folded = service_name.casefold()
        matches = [name for name in self.names if name.casefold() == folded]
        return matches[0] if len(matches) == 1 else None
