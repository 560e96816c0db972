"""Prometheus exposition of the sampler's state: a custom collector, a render cache and a small HTTP server.

Scrapes never touch hardware: they read the sampler's latest state. The exposition is rendered at most once
per state change (``Sampler.version``) and the same bytes (and their gzip) are served to every scrape until
the next change, so a scrape costs little more than a socket write.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import logging
import ssl
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from collector import __version__
from collector.config import BasicAuthConfig, PrometheusConfig, parse_listen
from collector.exporters.exposition import TextRenderer
from collector.readings import DeviceKind
from collector.sampler import Sampler

log = logging.getLogger(__name__)

GPU_LABELS = ("gpu", "uuid", "model")
CPU_LABELS = ("package", "domain", "source")


class SamplerCollector(Collector):
    """Builds fresh metric families from the sampler's state at each render."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def describe(self) -> list[Metric]:
        return []  # metrics depend on discovered devices; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        gpu: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "energy": CounterMetricFamily(
                "wattmeter_gpu_energy_joules",
                "Energy used by the GPU since the agent started counting (J).",
                labels=GPU_LABELS,
            ),
            "power": GaugeMetricFamily("wattmeter_gpu_power_watts", "GPU power draw now (W).", labels=GPU_LABELS),
            "limit": GaugeMetricFamily(
                "wattmeter_gpu_power_limit_watts", "Enforced GPU power limit (W).", labels=GPU_LABELS
            ),
            "util": GaugeMetricFamily(
                "wattmeter_gpu_utilization_ratio",
                "Fraction of time a kernel ran on the GPU (0-1).",
                labels=GPU_LABELS,
            ),
            "memory": GaugeMetricFamily(
                "wattmeter_gpu_memory_used_bytes", "GPU memory in use (bytes).", labels=GPU_LABELS
            ),
            "temperature": GaugeMetricFamily(
                "wattmeter_gpu_temperature_celsius",
                "GPU die temperature (degrees Celsius).",
                labels=GPU_LABELS,
            ),
            "clock": GaugeMetricFamily("wattmeter_gpu_sm_clock_hertz", "GPU SM clock (Hz).", labels=GPU_LABELS),
            "module": GaugeMetricFamily(
                "wattmeter_gpu_module_power_watts",
                "Module-scope power (Grace Hopper: GPU, CPU and memory of the module) (W).",
                labels=GPU_LABELS,
            ),
            "processes": GaugeMetricFamily(
                "wattmeter_gpu_processes", "Processes running on the GPU.", labels=GPU_LABELS
            ),
            "up": GaugeMetricFamily(
                "wattmeter_gpu_up",
                "1 if the GPU answered its last read, 0 if it is lost or failing.",
                labels=GPU_LABELS,
            ),
            "info": GaugeMetricFamily(
                "wattmeter_gpu_info",
                "GPU facts: energy_method is counter (hardware energy counter), integrated (power integrated by "
                "the agent) or simulated.",
                labels=(*GPU_LABELS, "source", "energy_method", "mig_mode", "mig_instances", "power_scope"),
            ),
        }
        cpu_energy = CounterMetricFamily(
            "wattmeter_cpu_energy_joules",
            'CPU/DRAM energy per RAPL domain (J); source="model" marks an estimate, not a measurement.',
            labels=CPU_LABELS,
        )
        cpu_power = GaugeMetricFamily(
            "wattmeter_cpu_power_watts",
            'CPU/DRAM power per RAPL domain over the last read interval (W); source="model" is an estimate.',
            labels=CPU_LABELS,
        )
        source_up = GaugeMetricFamily(
            "wattmeter_source_up", "1 if the source's last read succeeded.", labels=("source",)
        )
        source_errors = CounterMetricFamily(
            "wattmeter_source_errors_total", "Failed reads and device errors per source.", labels=("source",)
        )
        durations = HistogramMetricFamily(
            "wattmeter_source_read_duration_seconds",
            "Time one read of the source took (s).",
            labels=("source",),
        )

        for state in self.sampler.states:
            source_up.add_metric([state.name], 1.0 if state.up else 0.0)
            source_errors.add_metric([state.name], float(state.errors_total))
            histogram = state.read_durations
            durations.add_metric([state.name], histogram.cumulative(), histogram.sum_s)
            readings, statuses, device_up = state.readings, state.statuses, state.device_up
            for info in state.devices:
                reading = readings.get(info.device_id)
                if info.kind is DeviceKind.GPU:
                    labels = [str(info.index), info.uuid, info.model]
                    attributes = dict(info.attributes)
                    gpu["info"].add_metric(
                        [
                            *labels,
                            info.source,
                            info.method.value,
                            attributes.get("mig_mode", ""),
                            attributes.get("mig_instances", "0"),
                            attributes.get("power_scope", "gpu"),
                        ],
                        1.0,
                    )
                    gpu["up"].add_metric(labels, 1.0 if state.up and device_up.get(info.device_id) else 0.0)
                    if reading is not None:
                        gpu["energy"].add_metric(labels, reading.energy_j)
                        if reading.power_w is not None:
                            gpu["power"].add_metric(labels, reading.power_w)
                    status = statuses.get(info.device_id)
                    if status is None:
                        continue
                    for key, value in (
                        ("limit", status.power_limit_w),
                        ("util", status.utilization_ratio),
                        ("memory", status.memory_used_bytes),
                        ("temperature", status.temperature_c),
                        ("clock", status.sm_clock_hz),
                        ("module", status.module_power_w),
                    ):
                        if value is not None:
                            gpu[key].add_metric(labels, float(value))
                    gpu["processes"].add_metric(labels, float(len(status.processes)))
                elif reading is not None:
                    labels = [info.package, info.domain, info.source]
                    cpu_energy.add_metric(labels, reading.energy_j)
                    if reading.power_w is not None:
                        cpu_power.add_metric(labels, reading.power_w)

        yield from gpu.values()
        yield cpu_energy
        yield cpu_power
        yield source_up
        yield source_errors
        yield durations
        build = GaugeMetricFamily("wattmeter_build_info", "Wattmeter version.", labels=("version",))
        build.add_metric([__version__], 1.0)
        yield build


class ExpositionCache:
    """Renders the registry once per sampler version; every scrape in between gets the same bytes."""

    def __init__(self, sampler: Sampler, registry: CollectorRegistry) -> None:
        self.sampler = sampler
        self.registry = registry
        self._lock = threading.Lock()
        self._version = -1
        self._body = b""
        self._gzipped: bytes | None = None
        self._renderer = TextRenderer()
        self.renders = 0

    def body(self, want_gzip: bool = False) -> bytes:
        with self._lock:
            version = self.sampler.version
            if version != self._version:
                self._body = self._renderer.render(self.registry.collect())
                self._gzipped = None
                self._version = version
                self.renders += 1
            if not want_gzip:
                return self._body
            if self._gzipped is None:
                self._gzipped = gzip.compress(self._body, compresslevel=1)
            return self._gzipped


def check_password(auth: BasicAuthConfig, username: str, password: str) -> bool:
    user_ok = hmac.compare_digest(username.encode(), auth.username.encode())
    stored = auth.password_hash
    if stored.startswith("sha256:"):
        digest = hashlib.sha256(password.encode()).hexdigest()
        password_ok = hmac.compare_digest(digest, stored[7:].lower())
    else:
        import bcrypt  # only for bcrypt hashes: keeps the import off the default path

        password_ok = bcrypt.checkpw(password.encode(), stored.encode())
    return user_ok and password_ok


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHTTPServer
    _headers_buffer: list[bytes]
    protocol_version = "HTTP/1.1"
    # Headers and body go out in one write, and without Nagle a kept-alive connection does not wait ~40 ms
    # for the scraper's delayed ACK before the next response.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        # end_headers() without its flush: headers and body leave in one write (see disable_nagle_algorithm)
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.wfile.write(b"".join(self._headers_buffer))
        self._headers_buffer = []

    def _authorised(self) -> bool:
        auth = self.server.basic_auth
        if auth is None:
            return True
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                username, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                username, password = "", ""
            if check_password(auth, username, password):
                return True
        self._send(
            HTTPStatus.UNAUTHORIZED,
            b"unauthorized\n",
            "text/plain; charset=utf-8",
            {"WWW-Authenticate": 'Basic realm="wattmeter"'},
        )
        return False

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            if not self._authorised():
                return
            want_gzip = "gzip" in self.headers.get("Accept-Encoding", "")
            body = self.server.cache.body(want_gzip)
            extra = {"Content-Encoding": "gzip"} if want_gzip else None
            self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST, extra)
        elif path == "/healthz":
            if self.server.cache.sampler.any_up():
                self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
            else:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"no source is up\n", "text/plain; charset=utf-8")
        elif path == "/":
            self._send(
                HTTPStatus.OK,
                b'<html><body><a href="/metrics">metrics</a></body></html>\n',
                "text/html; charset=utf-8",
            )
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET


class MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        cache: ExpositionCache,
        basic_auth: BasicAuthConfig | None,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        import socket

        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.cache = cache
        self.basic_auth = basic_auth
        if ssl_context is not None:
            # handshake in the request thread, so a slow client cannot stall accept()
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client speaking plain HTTP to the TLS port, or hanging up mid-request: its problem, not a traceback
        log.debug("request from %s failed", client_address, exc_info=True)


class PrometheusExporter:
    """Serves ``/metrics`` and ``/healthz`` for the sampler on ``[prometheus] listen``."""

    def __init__(self, sampler: Sampler, config: PrometheusConfig) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SamplerCollector(sampler))
        self.cache = ExpositionCache(sampler, self.registry)
        context = None
        if config.tls_cert is not None and config.tls_key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(config.tls_cert, config.tls_key)
        self.server = MetricsHTTPServer(parse_listen(config.listen), self.cache, config.basic_auth, context)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        # the poll interval bounds how long shutdown() waits; 0.5 s keeps idle wake-ups down and exit under 2 s
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.5,), name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
