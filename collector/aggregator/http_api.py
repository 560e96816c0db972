"""The read-only JSON API: ``/api/v1/hosts``, ``/api/v1/workloads`` and ``/api/v1/samples``. Times are Unix ns.

Each route takes the query string and answers (status, body, content type); a bad parameter is a 400 whose JSON
``error`` says which and why. Served by the same HTTP server as ``/metrics`` (TLS, basic auth).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from collector.exporters.prometheus import Route
from collector.store.base import Store

JSON = "application/json"
DEFAULT_WINDOW_NS = 3600 * 1_000_000_000
MAX_NS = 2**63 - 1
PHASES = ("training", "inference", "unknown", "idle", "system", "other")


class BadRequest(Exception):
    pass


def _json(status: HTTPStatus, payload: Any) -> tuple[HTTPStatus, bytes, str]:
    return status, json.dumps(payload, separators=(",", ":")).encode() + b"\n", JSON


def _params(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise BadRequest(f"query {query!r} is not name=value pairs joined by &") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise BadRequest(f"unknown parameter {name!r}; this endpoint takes {', '.join(allowed)}")
        if name in params:
            raise BadRequest(f"parameter {name!r} given twice")
        params[name] = value
    return params


def _time(params: dict[str, str], name: str, default: int) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name}={text!r} is not a whole number of Unix nanoseconds") from None
    if not 0 <= value <= MAX_NS:
        raise BadRequest(f"{name}={value} is outside 0..{MAX_NS}")
    return value


def _window(params: dict[str, str], now_ns: int) -> tuple[int, int]:
    until = _time(params, "until", now_ns)
    since = _time(params, "since", max(0, until - DEFAULT_WINDOW_NS))
    if since > until:
        raise BadRequest(f"since={since} is after until={until}")
    return since, until


def _required(params: dict[str, str], name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise BadRequest(f"parameter {name!r} is required")
    return value


def _power(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


class HttpApi:
    def __init__(self, store: Store, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.store = store
        self.clock_ns = clock_ns

    def routes(self) -> dict[str, Route]:
        return {
            "/api/v1/hosts": self._guard(self.hosts),
            "/api/v1/workloads": self._guard(self.workloads),
            "/api/v1/samples": self._guard(self.samples),
        }

    @staticmethod
    def _guard(route: Callable[[str], Any]) -> Route:
        def answer(query: str) -> tuple[HTTPStatus, bytes, str]:
            try:
                return _json(HTTPStatus.OK, route(query))
            except BadRequest as exc:
                return _json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})

        return answer

    def hosts(self, query: str) -> dict[str, Any]:
        _params(query, ())
        return {
            "hosts": [
                {
                    "hostname": row.hostname,
                    "machine_id": row.machine_id,
                    "boot_id": row.boot_id,
                    "first_seen_ns": row.first_seen_ns,
                    "last_seen_ns": row.last_seen_ns,
                    "devices": [
                        {
                            "device_id": device.device_id,
                            "kind": device.kind,
                            "source": device.source,
                            "in_host_total": device.in_host_total,
                            "last_seen_ns": device.last_seen_ns,
                        }
                        for device in row.devices
                    ],
                }
                for row in self.store.hosts()
            ]
        }

    def workloads(self, query: str) -> dict[str, Any]:
        params = _params(query, ("since", "until", "phase"))
        since, until = _window(params, self.clock_ns())
        phase = params.get("phase") or None
        if phase is not None and phase not in PHASES:
            raise BadRequest(f"phase={phase!r} is not one of {', '.join(PHASES)}")
        # idle, system and other are stored as workloads of phase "" (see the wire protocol)
        store_phase = "" if phase in ("idle", "system", "other") else phase
        # rows of workload "" are the devices' own energy, not a workload's
        rows = [row for row in self.store.workload_energy(since, until, store_phase) if row.workload]
        if phase in ("idle", "system", "other"):
            rows = [row for row in rows if row.workload == phase]
        return {
            "since_ns": since,
            "until_ns": until,
            "workloads": [
                {
                    "hostname": row.hostname,
                    "workload": row.workload,
                    "phase": row.phase,
                    "job": row.job,
                    "energy_j": row.energy_j,
                    "by_device_j": row.by_device_j,
                }
                for row in rows
            ],
        }

    def samples(self, query: str) -> dict[str, Any]:
        params = _params(query, ("host", "device", "since", "until", "workload", "phase", "job"))
        host = _required(params, "host")
        device = _required(params, "device")
        since, until = _window(params, self.clock_ns())
        answer: dict[str, Any] = {"host": host, "device": device, "since_ns": since, "until_ns": until}
        workload = params.get("workload", "")
        if not workload:
            if params.get("phase") or params.get("job"):
                raise BadRequest("phase and job select a workload's samples: give workload too")
            rows = self.store.device_samples(host, device, since, until)
            answer["samples"] = [[t, e, _power(p)] for t, e, p in rows]
            return answer
        identity = (workload, params.get("phase", ""), params.get("job", ""))
        answer["workload"] = {"workload": identity[0], "phase": identity[1], "job": identity[2]}
        answer["samples"] = [[t, e] for t, e in self.store.workload_samples(host, identity, device, since, until)]
        return answer
