"""``wattmeter agent``: opens the sources, runs the sampler and serves Prometheus until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

from collector.carbon.series import CarbonSeriesSource
from collector.carbon.workload_metrics import WorkloadCarbon
from collector.config import AgentConfig
from collector.errors import RegistrationSocketError, SourceError, SourceUnavailable
from collector.exporters.exposition import Family
from collector.exporters.families import sampler_families, workload_families
from collector.exporters.grpc_stream import StreamExporter, stream_families
from collector.exporters.prometheus import FamiliesProvider, PrometheusExporter
from collector.readings import DeviceInfo, DeviceKind, DeviceReading
from collector.registration import RegistrationEvent, RegistrationServer, SpanEvent
from collector.sampler import Sampler, SourceState
from collector.sdnotify import Notifier, Watchdog
from collector.sources import BUILTIN_ORDER, registered_sources
from collector.sources.base import Source
from collector.sources.cpu_model import CpuModelSource
from collector.sources.simulated import SimulatedSource
from collector.workloads.identity import WorkloadIdentity
from collector.workloads.steps import WorkloadSteps
from collector.workloads.tracker import WorkloadTracker

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0  # hung-read checks; read_timeout_s is seconds, so 1 Hz is plenty
SHUTDOWN_BUDGET_S = 1.5  # systemd and the tests give 2 s; the interpreter's own exit needs a little
CLOSE_TIMEOUT_S = 0.3
STREAM_STOP_S = 0.5


def open_sources(config: AgentConfig) -> tuple[list[Source], dict[Source, str]]:
    """Build and open every enabled source. Returns (opened, {failed to open but worth retrying: why}).

    A source whose hardware is absent is left out with one info line. ``cpu_model`` in ``auto`` mode comes on
    only when no RAPL zone is readable and no simulated CPU was asked for; a simulated CPU never stands beside
    a real CPU source.
    """
    factories = registered_sources()
    ordered = [name for name in BUILTIN_ORDER if name in factories]
    ordered += sorted(set(factories) - set(ordered))
    opened: list[Source] = []
    retry: dict[Source, str] = {}
    for name in ordered:
        source = factories[name](config)
        if source is None:
            continue
        rapl_open = any(s.name == "rapl" for s in opened)
        if isinstance(source, SimulatedSource):
            source.index_offset = 1 + max((i.index for s in opened for i in gpus(s)), default=-1)
            if source.cpu and rapl_open:
                log.warning("simulated CPU off: this host's RAPL measures the CPU")
                source.cpu = False
            log.warning("simulated source on: %d simulated GPUs (not real hardware)", source.gpus)
        if isinstance(source, CpuModelSource) and config.sources.cpu_model.enabled == "auto":
            simulated_cpu = any(isinstance(s, SimulatedSource) and s.cpu for s in opened)
            if rapl_open or simulated_cpu:
                continue
            log.info('no readable RAPL: estimating CPU power from utilisation (source="model")')
        try:
            source.open()
        except SourceUnavailable as exc:
            log.info("source %s off: %s", name, exc)
            continue
        except Exception as exc:  # a source failing to open never stops the others; the sampler retries it
            reason = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
            log.error("source %s: %s", name, reason)
            retry[source] = reason
            continue
        opened.append(source)
    return opened, retry


def gpus(source: Source) -> list[DeviceInfo]:
    return [info for info in source.devices() if info.kind is DeviceKind.GPU]


def request_span_family(forwarded: int, dropped: int, refused: int) -> Family:
    """``wattmeter_request_spans_total``: spans from the registration socket by what became of them."""
    family = Family(
        "wattmeter_request_spans",
        "counter",
        "Request spans processes reported on the registration socket: forwarded (spooled for the aggregator), "
        "dropped (no [stream] target, pending spans at their cap, or their batch not spooled), refused (invalid).",
        ("result",),
    )
    for result, count in (("forwarded", forwarded), ("dropped", dropped), ("refused", refused)):
        family.add((result,), float(count))
    return family


class SamplerProgress:
    """For systemd's watchdog: whether the sampler's reads went on since the last call. A failed read counts (the
    loop runs; the source's health says it is down), a read hung in a driver does not. With no source open there is
    nothing to stall: a source waiting to open retries on its own backoff (up to 60 s, longer than WatchdogSec)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self._last = -1

    def __call__(self) -> bool:
        states = self.sampler.states
        done = sum(state.read_durations.count + state.errors_total for state in states)
        moved, self._last = done != self._last, done
        return moved or not any(state.opened for state in states)


class Agent:
    """Binds the metrics port, opens the sources, and runs the sampler and exporter until told to stop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.sampler = Sampler([], read_timeout_s=config.sampler.read_timeout_s)
        # bind first: a taken port is the commonest start-up error, and no driver should be touched for it
        self.exporter = PrometheusExporter(self.sampler, config.prometheus)
        opened, retry = open_sources(config)
        self.sampler.states = [SourceState(source) for source in [*opened, *retry]]
        for state in self.sampler.states:
            if state.source in retry:
                self.sampler.mark_failed_open(state, retry[state.source])
            else:
                self.sampler.mark_opened(state)
        if any(s.name == "rapl" for s in retry) and any(isinstance(s, CpuModelSource) for s in opened):
            self.sampler.add_listener(self._retire_estimate_once_rapl_reads)
        self.workloads: WorkloadTracker | None = None
        self.registration: RegistrationServer | None = None
        self._registration_up = False
        self.steps: WorkloadSteps | None = None
        if config.workloads.enabled:
            tracker = WorkloadTracker(config.workloads, self.sampler)
            self.workloads = tracker
            self.steps = WorkloadSteps.from_config(config.workloads, tracker.process_bindings)
            self.registration = RegistrationServer.from_config(
                config.api,
                on_register=self._on_register,
                on_disconnect=tracker.unregister,
                on_span=self._on_span,
                on_steps=self.steps.on_steps,
            )
        self.spans_unsent = 0  # request spans accepted with no [stream] target to send them to
        self.stream: StreamExporter | None = None
        if config.stream.enabled:
            self.stream = StreamExporter(
                config.stream,
                self.sampler,
                self.workloads,
                steps=self.steps,
                bindings_interval_s=config.workloads.interval_s,
            )
        self.carbon: WorkloadCarbon | None = None
        if config.carbon is not None:  # the grid's intensity and price always; CO2 per workload needs [workloads]
            self.carbon = WorkloadCarbon(CarbonSeriesSource(config.carbon), per_workload=self.workloads is not None)
            if self.workloads is not None:
                self.workloads.add_split_listener(self.carbon.on_split)
        self.exporter.cache.providers = self._providers()
        self.notifier = Notifier()
        self.watchdog = Watchdog(self.notifier, SamplerProgress(self.sampler))
        self._status = ""

    def _providers(self) -> list[FamiliesProvider]:
        providers: list[FamiliesProvider] = [lambda: sampler_families(self.sampler, self._extra_sources())]
        tracker, stream = self.workloads, self.stream
        if tracker is not None:
            providers.append(lambda: workload_families(tracker))
        if stream is not None:
            providers.append(lambda: stream_families(stream))
        if self.registration is not None:
            providers.append(self._span_families)
        if self.carbon is not None:
            providers.append(self.carbon.families)
        if self.steps is not None:
            providers.append(self.steps.families)
        return providers

    def _span_families(self) -> list[Family]:
        forwarded = dropped = 0
        if self.stream is not None:
            stats = self.stream.stats()
            forwarded, dropped = stats.spans_forwarded, stats.spans_dropped
        refused = self.registration.spans_refused if self.registration is not None else 0
        return [request_span_family(forwarded, dropped + self.spans_unsent, refused)]

    def _extra_sources(self) -> list[tuple[str, bool, int]]:
        extra = []
        if self.workloads is not None:
            extra.append(("workloads", self.workloads.up, self.workloads.errors_total))
        if self.registration is not None:
            extra.append(("api", self._registration_up, self.registration.errors))
        return extra

    def _on_register(self, event: RegistrationEvent) -> None:
        if self.workloads is not None:
            identity = WorkloadIdentity(
                event.workload,
                event.phase,
                event.job,
                origin="registration",
                labels=tuple(sorted(event.labels.items())),
            )
            self.workloads.register(event.pid, identity)

    def _on_span(self, event: SpanEvent) -> None:
        """On the registration thread: hand the span to the stream, or count it when nothing would send it."""
        if self.stream is None:
            self.spans_unsent += 1
            return
        self.stream.add_span(event)  # a full queue counts the drop itself

    def status_line(self) -> str:
        """What runs, for systemd's STATUS=: ``sampling 8 GPUs, 2 RAPL domains; streaming to X; metrics on Y``."""
        opened = [state for state in self.sampler.states if state.opened]
        sampling = []
        for name, label in (("nvml", "GPUs"), ("simulated", "simulated GPUs"), ("rapl", "RAPL domains")):
            count = sum(len(state.devices) for state in opened if state.name == name)
            if count or name != "simulated":
                sampling.append(f"{count} {label}")
        if any(state.name == "model" for state in opened):
            sampling.append("CPU estimated")
        parts = ["sampling " + ", ".join(sampling)]
        failing = sorted(state.name for state in self.sampler.states if state.last_error)
        if failing:
            parts.append("failing: " + ", ".join(failing))
        if self.stream is not None:
            parts.append(f"streaming to {self.config.stream.target}")
        parts.append(f"metrics on {self.config.prometheus.listen}")
        return "; ".join(parts)

    def _notify_status(self) -> None:
        status = self.status_line()
        if status != self._status:
            self._status = status
            self.notifier.status(status)

    def _retire_estimate_once_rapl_reads(self, source_name: str, readings: Sequence[DeviceReading]) -> None:
        if source_name == "rapl" and any(state.name == "model" for state in self.sampler.states):
            log.info('RAPL is readable now: the CPU estimate (source="model") stops')
            self.sampler.retire("model")

    @property
    def states(self) -> list[SourceState]:
        return self.sampler.states

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.stop_event.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        if self.workloads is not None:
            self.workloads.start()  # first: its listener must see the sampler's first readings
        if self.registration is not None:
            try:
                self.registration.start()
                self._registration_up = True
            except (OSError, RegistrationSocketError) as exc:
                log.error(
                    "registration socket %s: %s; processes cannot register (set [api] socket to a writable path)",
                    self.config.api.socket,
                    exc,
                )
        if self.stream is not None:
            self.stream.start()
        self.sampler.start()
        self.exporter.start()
        names = ", ".join(state.name for state in self.sampler.states) or "none"
        log.info("agent up: sources %s; metrics on %s", names, self.config.prometheus.listen)
        if not self.sampler.states:
            log.warning("no source is enabled and available: /metrics will hold no energy series")
        self._status = self.status_line()
        self.notifier.ready(self._status)
        self.watchdog.start()
        while not self.stop_event.wait(WATCH_INTERVAL_S):
            self.sampler.check_timeouts()
            if self.notifier.enabled:
                self._notify_status()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Everything within SHUTDOWN_BUDGET_S, even with a read or a close hung in a driver."""
        started = time.monotonic()
        deadline = started + SHUTDOWN_BUDGET_S
        self.watchdog.stop()  # first: no ping after STOPPING
        self.notifier.stopping("stopping")
        self.sampler.signal_stop()
        if self.workloads is not None:
            self.workloads.stop()
        # the socket before the stream: a span or steps message accepted after the stream's last flush would be lost
        if self.registration is not None and self._registration_up:
            self.registration.stop(timeout_s=0.2)
        if self.stream is not None:  # unsent batches stay in the spool for the next start
            self.stream.stop(timeout_s=STREAM_STOP_S)
        self.exporter.stop()
        self.sampler.stop(timeout_s=max(0.0, deadline - time.monotonic() - CLOSE_TIMEOUT_S))
        closer = threading.Thread(target=self._close_sources, name="close", daemon=True)
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))
        log.info("agent stopped in %.2f s", time.monotonic() - started)

    def _close_sources(self) -> None:
        for state in self.sampler.states:
            try:
                state.source.close()
            except Exception as exc:
                log.warning("source %s: close failed: %s", state.name, exc)
