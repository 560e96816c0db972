"""The read-only JSON API: ``/api/v1/hosts``, ``/api/v1/workloads``, ``/api/v1/samples``, ``/api/v1/requests``,
``/api/v1/requests/{id}`` and ``/api/v1/summary``. Times are Unix ns; ``since`` and ``until`` also take a duration
ago (``90s``, ``15m``, ``1h``, ``7d``). Energies are joules.

Each route takes the query string and answers (status, body, content type); a bad parameter is a 400 whose JSON
``error`` says which and why, an unknown request a 404 with the same shape. Served by the same HTTP server as
``/metrics`` (TLS, basic auth).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl

from collector.aggregator.config import parse_duration
from collector.exporters.prometheus import PrefixRoute, Route
from collector.store.base import RequestResult, RequestSummaryRow, Store

JSON = "application/json"
DEFAULT_WINDOW_NS = 3600 * 1_000_000_000
MAX_NS = 2**63 - 1
PHASES = ("training", "inference", "unknown", "idle", "system", "other")
REQUEST_PREFIX = "/api/v1/requests/"
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
ORDERS: dict[str, Literal["start", "energy"]] = {"start": "start", "energy": "energy"}
SUMMARY_BY: dict[str, Literal["model", "tenant", "host"]] = {"model": "model", "tenant": "tenant", "host": "host"}


T = TypeVar("T")


class BadRequest(Exception):
    pass


class NotFound(Exception):
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
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise BadRequest(f"unknown parameter {name!r}; this endpoint takes {takes}")
        if name in params:
            raise BadRequest(f"parameter {name!r} given twice")
        params[name] = value
    return params


def _time(params: dict[str, str], name: str, default: int, now_ns: int) -> int:
    """Unix ns, or a duration ago (``1h``: an hour before ``now_ns``)."""
    text = params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        try:
            ago_s = parse_duration(text)
        except ValueError:
            raise BadRequest(
                f"{name}={text!r} is neither a whole number of Unix nanoseconds nor a duration ago "
                "(a number and s, m, h or d: 90s, 15m, 1h, 7d)"
            ) from None
        ago_ns = ago_s * 1e9
        # longer ago than the epoch (even too long for a float: infinity) is the epoch
        return 0 if ago_ns >= now_ns else now_ns - round(ago_ns)
    if not 0 <= value <= MAX_NS:
        raise BadRequest(f"{name}={value} is outside 0..{MAX_NS}")
    return value


def _window(params: dict[str, str], now_ns: int) -> tuple[int, int]:
    until = _time(params, "until", now_ns, now_ns)
    since = _time(params, "since", max(0, until - DEFAULT_WINDOW_NS), now_ns)
    if since > until:
        raise BadRequest(f"since={since} is after until={until}")
    return since, until


def _required(params: dict[str, str], name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise BadRequest(f"parameter {name!r} is required")
    return value


def _limit(params: dict[str, str]) -> int:
    text = params.get("limit") or str(DEFAULT_LIMIT)
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"limit={text!r} is not a whole number") from None
    if not 1 <= value <= MAX_LIMIT:
        raise BadRequest(f"limit={value} is outside 1..{MAX_LIMIT}")
    return value


def _choice(params: dict[str, str], name: str, choices: dict[str, T]) -> T:
    """The value of ``name`` among ``choices`` (the first when not given)."""
    value = params.get(name) or next(iter(choices))
    if value not in choices:
        raise BadRequest(f"{name}={value!r} is not one of {', '.join(choices)}")
    return choices[value]


def _power(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _joules(value: float | None) -> float | None:
    """JSON has no NaN or infinity: such a value is unknown (null)."""
    return None if value is None or not math.isfinite(value) else value


def request_json(result: RequestResult) -> dict[str, Any]:
    return {
        "request_id": result.request_id,
        "model": result.model,
        "tenant": result.tenant,
        "hosts": list(result.hosts),
        "start_ns": result.start_ns,
        "end_ns": result.end_ns,
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
        "status": result.status,
        "energy_j": {
            "active": _joules(result.active_j),
            "full": _joules(result.full_j),
            "gpu": _joules(result.gpu_j),
            "cpu": _joules(result.cpu_j),
            "dram": _joules(result.dram_j),
        },
        "joules_per_output_token": _joules(result.joules_per_output_token),
        "co2_g": _joules(result.co2_g),
        "cost": _joules(result.cost),
        "spans": result.spans,
        "updated_ns": result.updated_ns,
    }


def summary_json(row: RequestSummaryRow) -> dict[str, Any]:
    return {
        "group": row.group,
        "count": row.count,
        "energy_j": _joules(row.energy_j),
        "p50_j": _joules(row.p50_j),
        "p95_j": _joules(row.p95_j),
        "output_tokens": row.output_tokens,
        "joules_per_output_token": _joules(row.joules_per_output_token),
    }


class HttpApi:
    def __init__(self, store: Store, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.store = store
        self.clock_ns = clock_ns

    def routes(self) -> dict[str, Route]:
        return {
            "/api/v1/hosts": self._guard(self.hosts),
            "/api/v1/workloads": self._guard(self.workloads),
            "/api/v1/samples": self._guard(self.samples),
            "/api/v1/requests": self._guard(self.requests),
            "/api/v1/summary": self._guard(self.summary),
        }

    def prefix_routes(self) -> dict[str, PrefixRoute]:
        """``/api/v1/requests/{id}``, the id percent-decoded."""
        return {REQUEST_PREFIX: lambda request_id, query: self._guard(lambda q: self.request(request_id, q))(query)}

    @staticmethod
    def _guard(route: Callable[[str], Any]) -> Route:
        def answer(query: str) -> tuple[HTTPStatus, bytes, str]:
            try:
                return _json(HTTPStatus.OK, route(query))
            except BadRequest as exc:
                return _json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except NotFound as exc:
                return _json(HTTPStatus.NOT_FOUND, {"error": str(exc)})

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

    def request(self, request_id: str, query: str) -> dict[str, Any]:
        _params(query, ())
        result = self.store.request(request_id)
        if result is None:
            raise NotFound(f"request {request_id!r} is unknown: no span of it has arrived, or it was pruned")
        return request_json(result)

    def requests(self, query: str) -> dict[str, Any]:
        params = _params(query, ("model", "since", "until", "limit", "order"))
        since, until = _window(params, self.clock_ns())
        limit = _limit(params)
        order = _choice(params, "order", ORDERS)
        rows = self.store.requests(params.get("model") or None, since, until, limit, order)
        return {"since_ns": since, "until_ns": until, "requests": [request_json(row) for row in rows]}

    def summary(self, query: str) -> dict[str, Any]:
        params = _params(query, ("by", "since", "until"))
        since, until = _window(params, self.clock_ns())
        by = _choice(params, "by", SUMMARY_BY)
        rows = self.store.request_summary(by, since, until)
        return {"by": by, "since_ns": since, "until_ns": until, "groups": [summary_json(row) for row in rows]}
