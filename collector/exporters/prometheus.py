"""Prometheus exposition of the sampler's state: a custom collector, a render cache and a small HTTP server.

Scrapes never touch hardware: they read the sampler's latest state. The exposition is rendered at most once
per state change (``Sampler.version``) and the same bytes (and their gzip) are served to every scrape until
the next change, so a scrape costs little more than a socket write.

The HTTP server (``MetricsHTTPServer``) also serves the aggregator: it takes any exposition body, a health check
and extra GET routes, all behind the same TLS and basic auth.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from collector.config import BasicAuthConfig, PrometheusConfig, parse_listen
from collector.exporters.exposition import Family, TextRenderer, to_metric
from collector.exporters.families import sampler_families
from collector.sampler import Sampler

log = logging.getLogger(__name__)

AUTH_CACHE_TTL_S = 60.0


class SamplerCollector(Collector):
    """A prometheus_client collector of the agent's families, for anything built on a ``CollectorRegistry``."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def describe(self) -> list[Metric]:
        return []  # metrics depend on discovered devices; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        for family in sampler_families(self.sampler):
            yield to_metric(family)


FamiliesProvider = Callable[[], Iterable[Family]]
# A GET route: the query string (without "?") -> status, body, content type.
Route = Callable[[str], tuple[HTTPStatus, bytes, str]]
PrefixRoute = Callable[[str, str], tuple[HTTPStatus, bytes, str]]  # (rest of the path, query)
# A health check: (healthy, why not).
HealthCheck = Callable[[], tuple[bool, str]]


class ExpositionBody(Protocol):
    def body(self, want_gzip: bool = False) -> bytes: ...


class ExpositionCache:
    """Renders once per sampler version; every scrape in between gets the same bytes (and the same gzip)."""

    def __init__(self, sampler: Sampler, providers: Sequence[FamiliesProvider] | None = None) -> None:
        self.sampler = sampler
        self.providers = list(providers) if providers is not None else [lambda: sampler_families(sampler)]
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
                self._body = self._renderer.render(family for provider in self.providers for family in provider())
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


class AuthCache:
    """Remembers credentials that passed for a while, so a bcrypt check (~0.2 s of CPU) is not paid per scrape.

    Holds SHA-256 digests of the Authorization header, never the header itself.
    """

    def __init__(self, ttl_s: float = AUTH_CACHE_TTL_S, size: int = 16) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._expiry: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def hit(self, header: str) -> bool:
        digest = hashlib.sha256(header.encode()).digest()
        with self._lock:
            expiry = self._expiry.get(digest)
            return expiry is not None and expiry > time.monotonic()

    def add(self, header: str) -> None:
        digest = hashlib.sha256(header.encode()).digest()
        with self._lock:
            if len(self._expiry) >= self.size:
                self._expiry.clear()
            self._expiry[digest] = time.monotonic() + self.ttl_s


def _request_target(raw: str) -> str:
    """The request line's target as text: ``http.server`` reads it as Latin-1, but a client that sends non-ASCII
    unencoded (curl does: ``/api/v1/requests/ü``) means UTF-8, as percent-encoded targets do."""
    if raw.isascii():
        return raw
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8: left as read, so the id or value is unknown rather than changed
        return raw


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHTTPServer
    _headers_buffer: list[bytes]
    protocol_version = "HTTP/1.1"
    # Headers and body go out in one write, and without Nagle a kept-alive connection does not wait ~40 ms
    # for the scraper's delayed ACK before the next response.
    disable_nagle_algorithm = True
    timeout = 30  # seconds: an idle keep-alive connection, or a TLS client that never says hello, lets go

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
            if self.server.auth_cache.hit(header):
                return True
            try:
                username, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                username, password = "", ""
            if check_password(auth, username, password):
                self.server.auth_cache.add(header)
                return True
        self._send(
            HTTPStatus.UNAUTHORIZED,
            b"unauthorized\n",
            "text/plain; charset=utf-8",
            {"WWW-Authenticate": 'Basic realm="wattmeter"'},
        )
        return False

    def do_GET(self) -> None:
        path, _, query = _request_target(self.path).partition("?")
        if path == "/metrics":
            if not self._authorised():
                return
            want_gzip = "gzip" in self.headers.get("Accept-Encoding", "")
            body = self.server.cache.body(want_gzip)
            extra = {"Vary": "Accept-Encoding"}
            if want_gzip:
                extra["Content-Encoding"] = "gzip"
            self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST, extra)
        elif path == "/healthz":
            healthy, why = self.server.health()
            if healthy:
                self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
            else:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, why.encode() + b"\n", "text/plain; charset=utf-8")
        elif (route := self.server.route(path)) is not None:
            if not self._authorised():
                return
            try:
                status, body, content_type = route(query)
            except Exception:  # one failing route never takes the server down; the log has the traceback
                log.exception("GET %s failed", self.path)
                status, body, content_type = HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain"
            self._send(status, body, content_type)
        elif path == "/":
            self._send(
                HTTPStatus.OK,
                b'<html><body><a href="/metrics">metrics</a></body></html>\n',
                "text/html; charset=utf-8",
            )
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET

    def _read_only(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET only\n", "text/plain; charset=utf-8", {"Allow": "GET, HEAD"}
        )
        self.close_connection = True  # the request body, if any, was not read

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only


class MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        cache: ExpositionBody,
        basic_auth: BasicAuthConfig | None,
        ssl_context: ssl.SSLContext | None,
        health: HealthCheck,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        import socket

        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.cache = cache
        self.health = health
        self.routes = dict(routes or {})
        self.prefix_routes: dict[str, PrefixRoute] = {}
        """Paths ending in "/" whose route takes the rest of the path (percent-decoded) too: ``/api/v1/requests/``
        answers ``/api/v1/requests/{id}``."""
        self.basic_auth = basic_auth
        self.auth_cache = AuthCache()
        if ssl_context is not None:
            # handshake in the request thread, so a slow client cannot stall accept()
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def route(self, path: str) -> Route | None:
        """The route answering ``path``: an exact one, else the prefix route it lies under (with a non-empty rest)."""
        exact = self.routes.get(path)
        if exact is not None:
            return exact
        for prefix, prefix_route in self.prefix_routes.items():
            if path.startswith(prefix) and len(path) > len(prefix):
                rest = unquote(path[len(prefix) :])
                return lambda query: prefix_route(rest, query)
        return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client speaking plain HTTP to the TLS port, or hanging up mid-request: its problem, not a traceback
        log.debug("request from %s failed", client_address, exc_info=True)


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class PrometheusExporter:
    """Serves ``/metrics`` and ``/healthz`` for the sampler on ``[prometheus] listen``."""

    def __init__(self, sampler: Sampler, config: PrometheusConfig) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SamplerCollector(sampler))
        self.cache = ExpositionCache(sampler)
        context = None
        if config.tls_cert is not None and config.tls_key is not None:
            context = server_ssl_context(config.tls_cert, config.tls_key)
        self.server = MetricsHTTPServer(
            parse_listen(config.listen),
            self.cache,
            config.basic_auth,
            context,
            health=lambda: (sampler.any_up(), "no source is up"),
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        # the poll interval bounds how long shutdown() waits; 0.5 s keeps idle wake-ups down and exit under 2 s
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.5,), name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever, which never ran otherwise
            self.server.shutdown()
            self._thread = None
        self.server.server_close()
