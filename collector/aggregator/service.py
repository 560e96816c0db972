"""``wattmeter aggregator``: opens the store, serves gRPC (ingest) and HTTP (API, /metrics), prunes, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from collector.aggregator.checker import Checker, InlineChecker
from collector.aggregator.checks import Limits
from collector.aggregator.config import AggregatorConfig
from collector.aggregator.grpc_server import GrpcServer
from collector.aggregator.http_api import HttpApi
from collector.aggregator.ingest import Ingest
from collector.aggregator.metrics import AggregatorMetrics, ScrapeRenderer
from collector.aggregator.processes import ProcessChecker
from collector.aggregator.request_engine import RequestEngine
from collector.aggregator.request_metrics import RequestMetrics
from collector.aggregator.writer import GroupWriter
from collector.carbon.series import IntensitySeries
from collector.config import parse_listen
from collector.exporters.prometheus import MetricsHTTPServer, server_ssl_context
from collector.sdnotify import LoopHeartbeat, Notifier, Watchdog
from collector.store import open_store
from collector.store.base import Store
from collector.store.urls import redact

log = logging.getLogger(__name__)

GRPC_GRACE_S = 1.0  # in-flight batches get this long to be stored and acknowledged; SIGTERM to exit stays under 2 s
HTTP_POLL_S = 0.1  # bounds how long the HTTP server's shutdown waits
WRITER_CLOSE_S = 0.5  # what is queued when gRPC has stopped is written within this (else left to the store's close)
ENGINE_STOP_S = 0.5
READ_THREADS = 4  # store reads off the event loop: an instance's state after a restart, pruning
# ingest and the request engine allocate many short-lived containers (a call's columns, rows, per-request lists): at
# the default first-generation threshold (700) the collector ran every few dozen spans, 2.5 us a span of ~50 (the
# request pipeline in one process, 60,000 spans); at 50,000, 0.3 us. Older generations keep their thresholds.
GC_FIRST_GENERATION = 50_000


class Aggregator:
    """Everything of one aggregator process. ``start``/``stop`` run on an asyncio loop; ``run`` owns one."""

    def __init__(self, config: AggregatorConfig, store: Store | None = None) -> None:
        self.config = config
        # bind HTTP first: a taken port is the commonest start-up error, found before the store is touched
        context = None
        if config.http.tls_cert is not None and config.http.tls_key is not None:
            context = server_ssl_context(config.http.tls_cert, config.http.tls_key)
        self.metrics = AggregatorMetrics()
        self.http = MetricsHTTPServer(
            parse_listen(config.http.listen),
            ScrapeRenderer(self.metrics),
            config.http.basic_auth,
            context,
            self.healthy,
        )
        self._owns_store = store is None
        try:
            self.store = store if store is not None else open_store(config.storage.url)
        except BaseException:
            self.http.server_close()
            raise
        try:
            self.store.migrate()
            # the fleet counters go on from the stored rollups (the device rows, workload "", are not workloads)
            far = time.time_ns() + 86400 * 10**9
            self.metrics.seed_fleet_energy(row for row in self.store.workload_energy(0, far) if row.workload)
        except BaseException:
            self.http.server_close()
            if self._owns_store:
                self.store.close()
            raise
        if config.carbon is not None:  # fleet CO2 and cost beside the fleet energy
            from collector.carbon.fleet_metrics import FleetCarbon
            from collector.carbon.series import CarbonSeriesSource

            fleet = FleetCarbon(CarbonSeriesSource(config.carbon), lambda: dict(self.metrics.fleet_energy))
            self.metrics.providers.append(fleet.families)
        self.http_api = HttpApi(self.store)
        self.http.routes = self.http_api.routes()
        self.http.prefix_routes = self.http_api.prefix_routes()
        self.executor = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="store-read")
        self.writer = GroupWriter(self.store, on_commit=self.metrics.count_commit)
        self.checker = self._checker()
        self.ingest = Ingest(self.store, self.checker, self.writer, self.metrics, self.executor)
        self.ingest.on_late_samples = self._reopen_requests
        self.ingest.late_after_ns = round(config.requests.finalize_grace_s * 1e9)
        self.grpc = GrpcServer(config.grpc, self.ingest, self.metrics, config.ingest)
        self.request_metrics = RequestMetrics(config.requests.max_label_values)
        self.metrics.providers.append(self.request_metrics.families)
        self.requests = RequestEngine(self.store, config.requests, self.request_metrics, carbon=self._request_carbon())
        self._http_thread: threading.Thread | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._serving = False
        self.notifier = Notifier()
        self._watchdog: Watchdog | None = None

    def _reopen_requests(self, hostname: str, since_ns: int, until_ns: int) -> None:
        """Samples of a time past the grace arrived (a spool replayed): the requests then finalised as approximate or
        no_samples on that host go back to pending, off the event loop; the engine's next pass computes them again."""

        def reopen() -> None:
            try:
                with self.requests.reopening(hostname, since_ns, until_ns) as counted:  # not under a pass's results
                    reopened = self.store.reopen_requests(hostname, since_ns, until_ns)
                    counted.update(reopened)
            except Exception:  # they stay as they were: approximate or no_samples, as before the samples came
                log.exception("reopening requests on %s after late samples failed", hostname)
                return
            if reopened:
                log.info("%d requests on %s computed again: their samples arrived late", len(reopened), hostname)
                self.requests.note_requests_reopened()

        self.executor.submit(reopen)

    def _request_carbon(self) -> Callable[[], IntensitySeries] | None:
        """The intensity series the request engine prices requests with (its own source: it runs on its thread)."""
        if self.config.carbon is None:
            return None
        from collector.carbon.series import CarbonSeriesSource

        source = CarbonSeriesSource(self.config.carbon)
        return lambda: source.current(time.monotonic())

    def _checker(self) -> Checker:
        ingest = self.config.ingest
        limits = Limits(ingest.max_future_s, ingest.max_batch_samples)
        if ingest.workers == 0:
            return InlineChecker(limits)
        return ProcessChecker(limits, ingest.workers)

    @property
    def grpc_port(self) -> int:
        return self.grpc.port

    @property
    def http_port(self) -> int:
        return int(self.http.server_address[1])

    def healthy(self) -> tuple[bool, str]:
        if not self._serving:
            return False, "the gRPC server is not serving"
        if self.ingest.store_error is not None:
            return False, f"storage failing: {self.ingest.store_error}"
        return True, ""

    async def start(self) -> None:
        await self.checker.start()
        try:
            await self.grpc.start()
        except BaseException:
            await self.checker.close()
            raise
        self._http_thread = threading.Thread(
            target=self.http.serve_forever, args=(HTTP_POLL_S,), name="http", daemon=True
        )
        self._http_thread.start()
        self._prune_task = asyncio.create_task(self._prune_loop())
        gc.set_threshold(GC_FIRST_GENERATION, *gc.get_threshold()[1:])
        self.requests.start()
        self._serving = True
        log.info(
            "aggregator up: gRPC on %s (port %d), HTTP on %s (port %d), storage %s",
            self.config.grpc.listen,
            self.grpc_port,
            self.config.http.listen,
            self.http_port,
            redact(self.config.storage.url),
        )
        self.notifier.ready(
            f"gRPC on {self.config.grpc.listen}, HTTP on {self.config.http.listen}, "
            f"storage {redact(self.config.storage.url)}"
        )
        heartbeat = LoopHeartbeat(asyncio.get_running_loop())
        # the writer's thread ends only on close or a bug; a store that hangs shows in /healthz, not here
        self._watchdog = Watchdog(self.notifier, lambda: heartbeat() and self.writer._thread.is_alive())
        self._watchdog.start()

    async def _prune_loop(self) -> None:
        storage = self.config.storage
        loop = asyncio.get_running_loop()
        while True:
            try:
                deleted = await loop.run_in_executor(
                    self.executor,
                    self.store.prune,
                    time.time_ns(),
                    storage.raw_retention_s,
                    storage.rollup_retention_s,
                )
                log.debug("pruned %d rows", deleted)
            except Exception:  # pruning failing never stops ingest; it is tried again next interval
                log.exception("pruning the store failed")
            await asyncio.sleep(storage.prune_interval_s)

    async def stop(self) -> None:
        started = time.monotonic()
        if self._watchdog is not None:
            self._watchdog.stop()  # first: no ping after STOPPING
        self.notifier.stopping("stopping")
        self._serving = False
        if self._prune_task is not None:
            self._prune_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prune_task
        await self.grpc.stop(GRPC_GRACE_S)
        # a pass in progress gets this long; one stuck in the store is left to its daemon thread and the store's close
        await asyncio.get_running_loop().run_in_executor(None, self.requests.stop, ENGINE_STOP_S)
        if self._http_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.http.shutdown)
            self._http_thread = None
        self.http.server_close()
        await self.checker.close()
        self.writer.close(WRITER_CLOSE_S)
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._owns_store:
            self.store.close()
        log.info("aggregator stopped in %.2f s", time.monotonic() - started)

    def close(self) -> None:
        """Release what ``__init__`` opened, for an aggregator that was never started."""
        self.http.server_close()
        self.writer.close(WRITER_CLOSE_S)
        self.executor.shutdown(wait=False)
        if self._owns_store:
            self.store.close()

    def run(self) -> int:
        return asyncio.run(self._run())

    async def _run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await self.start()
        except BaseException:
            self.close()
            raise
        await stop.wait()
        await self.stop()
        return 0
