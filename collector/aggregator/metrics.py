"""Fleet and aggregator metrics: state that ingest and the gRPC server update, rendered fresh at each scrape."""

from __future__ import annotations

import gzip
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from collector import __version__
from collector.exporters.exposition import Family, TextRenderer
from collector.store.base import WorkloadEnergyRow

BATCH_RESULTS = ("stored", "duplicate", "rejected", "error")
SPAN_RESULTS = ("accepted", "rejected")
POWER_STALE_S = 120.0  # a host silent this long leaves wattmeter_fleet_power_watts (its agent or link is down)


def phase_label(workload: str, phase: str) -> str:
    """The ``phase`` label of fleet energy: the workload's phase, or idle/system/other for the special keys."""
    return phase or workload


class AggregatorMetrics:
    """Counters and gauges of one aggregator process; thread-safe."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._monotonic = monotonic
        self.batches: Counter[str] = Counter()
        self.spans: Counter[str] = Counter()
        self.dropped_fields: Counter[str] = Counter()
        self.samples_stored = 0
        self.store_commits = 0  # transactions that stored batches (a group commit holds many)
        self.agents_connected = 0
        self.fleet_energy: dict[tuple[str, str], float] = {}  # (host, phase label) -> J
        self._power: dict[str, dict[str, tuple[float, float]]] = {}  # host -> device -> (W, monotonic time)
        self.providers: list[Callable[[], list[Family]]] = []  # more families (the OTLP receiver's counters)

    def seed_fleet_energy(self, rows: Iterable[WorkloadEnergyRow]) -> None:
        """Start the fleet energy counters from stored rollups, so they survive a restart (until pruned)."""
        with self._lock:
            for row in rows:
                key = (row.hostname, phase_label(row.workload, row.phase))
                self.fleet_energy[key] = self.fleet_energy.get(key, 0.0) + row.energy_j

    def count_batch(self, result: str) -> None:
        with self._lock:
            self.batches[result] += 1

    def count_commit(self, batches: int) -> None:
        with self._lock:
            self.store_commits += 1

    def count_spans(self, accepted: int, rejected: int) -> None:
        with self._lock:
            self.spans["accepted"] += accepted
            self.spans["rejected"] += rejected

    def count_dropped(self, field: str) -> None:
        with self._lock:
            self.dropped_fields[field] += 1

    def stream_opened(self) -> None:
        with self._lock:
            self.agents_connected += 1

    def stream_closed(self) -> None:
        with self._lock:
            self.agents_connected -= 1

    def add_stored(
        self,
        samples: int,
        energy: dict[tuple[str, str], float],
        power: dict[str, dict[str, float]],
    ) -> None:
        """One stored batch: its sample count, fleet energy deltas ((host, phase label) -> J) and the latest power
        of its hosts' in_host_total devices (host -> device -> W)."""
        now = self._monotonic()
        with self._lock:
            self.samples_stored += samples
            for key, joules in energy.items():
                self.fleet_energy[key] = self.fleet_energy.get(key, 0.0) + joules
            for host, devices in power.items():
                known = self._power.setdefault(host, {})
                for device_id, watts in devices.items():
                    known[device_id] = (watts, now)

    def fleet_power(self) -> dict[str, float]:
        """Host -> summed latest power of its in_host_total devices, leaving out devices silent for too long."""
        fresh_after = self._monotonic() - POWER_STALE_S
        with self._lock:
            totals = {}
            for host, devices in self._power.items():
                fresh = [watts for watts, seen in devices.values() if seen >= fresh_after]
                if fresh:
                    totals[host] = sum(fresh)
            return totals

    def families(self) -> list[Family]:
        power = self.fleet_power()
        with self._lock:
            energy = Family(
                "wattmeter_fleet_energy_joules",
                "counter",
                "Energy of workloads on devices that add into host totals (J), by host and phase; phase idle, "
                "system or other for energy of no workload. Seeded from stored rollups at start.",
                ("host", "phase"),
            )
            for (host, phase), joules in sorted(self.fleet_energy.items()):
                energy.add((host, phase), joules)
            fleet_power = Family(
                "wattmeter_fleet_power_watts",
                "gauge",
                "Latest summed power of each host's devices that add into host totals (W).",
                ("host",),
            )
            for host, watts in sorted(power.items()):
                fleet_power.add((host,), watts)
            batches = Family(
                "wattmeter_aggregator_batches",
                "counter",
                "Batches received, by result: stored, duplicate (already stored), rejected (invalid, acknowledged "
                "with an error) or error (storage failed, not acknowledged).",
                ("result",),
            )
            for result in BATCH_RESULTS:
                batches.add((result,), float(self.batches[result]))
            spans = Family("wattmeter_aggregator_spans", "counter", "Request spans received, by result.", ("result",))
            for result in SPAN_RESULTS:
                spans.add((result,), float(self.spans[result]))
            dropped = Family(
                "wattmeter_aggregator_dropped_fields",
                "counter",
                "Invalid optional fields dropped from otherwise stored batches (e.g. a negative power array).",
                ("field",),
            )
            for field_name, count in sorted(self.dropped_fields.items()):
                dropped.add((field_name,), float(count))
            samples = Family(
                "wattmeter_aggregator_stored_samples", "counter", "Device and workload samples stored.", ()
            )
            samples.add((), float(self.samples_stored))
            commits = Family(
                "wattmeter_aggregator_store_commits",
                "counter",
                "Store transactions that committed batches: one holds all waiting when it began (group commit).",
                (),
            )
            commits.add((), float(self.store_commits))
            connected = Family("wattmeter_aggregator_agents_connected", "gauge", "Agent streams open now.", ())
            connected.add((), float(self.agents_connected))
            info = Family("wattmeter_aggregator_build_info", "gauge", "Aggregator version.", ("version",))
            info.add((__version__,), 1.0)
        extra = [family for provider in self.providers for family in provider()]
        return [energy, fleet_power, batches, spans, dropped, samples, commits, connected, info, *extra]


class ScrapeRenderer:
    """Renders the families at every scrape (a scrape is rare next to batches, which change them all the time)."""

    def __init__(self, metrics: AggregatorMetrics) -> None:
        self.metrics = metrics
        self._renderer = TextRenderer()
        self._lock = threading.Lock()

    def body(self, want_gzip: bool = False) -> bytes:
        with self._lock:
            text = self._renderer.render(self.metrics.families())
        return gzip.compress(text, compresslevel=1) if want_gzip else text
