"""``wattmeter agent``: opens the sources, runs the sampler and serves Prometheus until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from collector.config import AgentConfig
from collector.errors import SourceError, SourceUnavailable
from collector.exporters.prometheus import PrometheusExporter
from collector.readings import DeviceKind
from collector.sampler import Sampler, SourceState
from collector.sources import BUILTIN_ORDER, registered_sources
from collector.sources.base import Source
from collector.sources.cpu_model import CpuModelSource
from collector.sources.simulated import SimulatedSource

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0  # hung-read checks; read_timeout_s is seconds, so 1 Hz is plenty
CLOSE_TIMEOUT_S = 0.5


def open_sources(config: AgentConfig) -> tuple[list[Source], dict[Source, str]]:
    """Build and open every enabled source. Returns (opened, {failed to open but worth retrying: why}).

    A source whose hardware is absent is left out with one info line. ``cpu_model`` in ``auto`` mode comes on
    only when no RAPL zone is readable (and no simulated CPU stands in for one).
    """
    factories = registered_sources()
    ordered = [name for name in BUILTIN_ORDER if name in factories]
    ordered += sorted(set(factories) - set(ordered))
    opened: list[Source] = []
    retry: dict[Source, str] = {}
    gpu_count = 0
    for name in ordered:
        source = factories[name](config)
        if source is None:
            continue
        if isinstance(source, CpuModelSource) and config.sources.cpu_model.enabled == "auto":
            cpu_measured = any(
                info.kind is not DeviceKind.GPU
                for s in opened
                if s.name in ("rapl", "simulated")
                for info in s.devices()
            )
            if cpu_measured:
                continue
            log.info('no readable RAPL: estimating CPU power from utilisation (source="model")')
        if isinstance(source, SimulatedSource):
            source.index_offset = gpu_count
            log.warning("simulated source on: %d simulated GPUs (not real hardware)", source.gpus)
        try:
            source.open()
        except SourceUnavailable as exc:
            log.info("source %s off: %s", name, exc)
            continue
        except SourceError as exc:
            log.error("source %s: %s", name, exc)
            retry[source] = str(exc)
            continue
        gpu_count += sum(1 for info in source.devices() if info.kind is DeviceKind.GPU)
        opened.append(source)
    return opened, retry


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stop_event = threading.Event()
        opened, retry = open_sources(config)
        self.sampler = Sampler([*opened, *retry], read_timeout_s=config.sampler.read_timeout_s)
        for state in self.sampler.states:
            if state.source in retry:
                # already logged once; the sampler retries the open with backoff and logs only a new error
                state.last_error = retry[state.source]
                state.errors_total = 1
            else:
                self.sampler.mark_opened(state)
        self.exporter = PrometheusExporter(self.sampler, config.prometheus)

    @property
    def states(self) -> list[SourceState]:
        return self.sampler.states

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.stop_event.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.sampler.start()
        self.exporter.start()
        names = ", ".join(state.name for state in self.sampler.states) or "none"
        log.info("agent up: sources %s; metrics on %s", names, self.config.prometheus.listen)
        if not self.sampler.states:
            log.warning("no source is enabled and available: /metrics will hold no energy series")
        while not self.stop_event.wait(WATCH_INTERVAL_S):
            self.sampler.check_timeouts()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        started = time.monotonic()
        self.exporter.stop()
        self.sampler.stop(timeout_s=1.0)
        closer = threading.Thread(target=self._close_sources, name="close", daemon=True)
        closer.start()
        closer.join(CLOSE_TIMEOUT_S)  # a driver hung in close must not hold up the exit
        log.info("agent stopped in %.2f s", time.monotonic() - started)

    def _close_sources(self) -> None:
        for state in self.sampler.states:
            try:
                state.source.close()
            except Exception as exc:
                log.warning("source %s: close failed: %s", state.name, exc)
