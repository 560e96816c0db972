"""What the demo's view shows, read the way any user would: the agent's ``/metrics``, the aggregator's HTTP API,
and the synthetic server's log of the requests it served (for the ones the aggregator has not priced yet)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HTTP_TIMEOUT_S = 1.0
LAST_REQUESTS = 8


@dataclass(frozen=True)
class DeviceLine:
    """One GPU or CPU package: ``what`` says how it is measured (``simulated``, ``nvml``, ``rapl``, ``estimate``)."""

    device: str
    what: str
    power_w: float | None
    energy_j: float
    workloads: tuple[tuple[str, str, float], ...] = ()  # (workload, phase, joules) on this device, largest first


@dataclass(frozen=True)
class RequestLine:
    request_id: str
    model: str
    input_tokens: int
    output_tokens: int
    status: str  # pending | final | approximate | no_samples; "sent" when the aggregator answers no request API
    energy_j: float | None = None  # active
    joules_per_output_token: float | None = None


@dataclass(frozen=True)
class ModelLine:
    model: str
    count: int
    energy_j: float
    joules_per_output_token: float | None


@dataclass
class Snapshot:
    devices: list[DeviceLine] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # joules per phase on this host, idle included
    agent_up: bool = False
    requests: list[RequestLine] = field(default_factory=list)
    models: list[ModelLine] = field(default_factory=list)
    request_api: bool = False  # whether the aggregator answers /api/v1/requests
    served: int = 0  # requests the synthetic server finished


def get_json(url: str) -> Any | None:
    """The JSON at ``url``, or None when it is not there (404: the route does not exist yet) or unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return json.loads(response.read())
    except (OSError, ValueError, urllib.error.HTTPError):
        return None


def get_text(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return str(response.read().decode("utf-8", "replace"))
    except (OSError, urllib.error.HTTPError):
        return None


def parse_agent_metrics(text: str) -> tuple[list[DeviceLine], dict[str, float]]:
    """GPUs and CPU packages with their power, energy and workloads; energy per phase (with the GPUs' idle)."""
    from prometheus_client.parser import text_string_to_metric_families

    gpu_energy: dict[str, float] = {}
    gpu_power: dict[str, float] = {}
    gpu_source: dict[str, str] = {}
    cpu_energy: dict[str, float] = {}
    cpu_power: dict[str, float] = {}
    cpu_source: dict[str, str] = {}
    by_device: dict[str, list[tuple[str, str, float]]] = {}
    phases: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, float(sample.value)
            if sample.name == "wattmeter_gpu_energy_joules_total":
                gpu_energy[f"gpu{labels['gpu']}"] = value
            elif sample.name == "wattmeter_gpu_power_watts":
                gpu_power[f"gpu{labels['gpu']}"] = value
            elif sample.name == "wattmeter_gpu_info":
                gpu_source[f"gpu{labels['gpu']}"] = labels.get("source", "")
            elif sample.name in ("wattmeter_cpu_energy_joules_total", "wattmeter_cpu_power_watts"):
                if labels.get("domain") != "package":
                    continue  # core, uncore, dram and psys are parts of a package or more than one
                name = f"cpu{labels.get('package', '')}"
                target = cpu_energy if sample.name.endswith("_total") else cpu_power
                target[name] = value
                cpu_source[name] = labels.get("source", "")
            elif sample.name == "wattmeter_workload_energy_joules_total" and labels.get("phase"):
                by_device.setdefault(labels["device"], []).append((labels["workload"], labels["phase"], value))
            elif sample.name == "wattmeter_phase_energy_joules_total":
                phases[labels["phase"]] = value
            elif sample.name == "wattmeter_idle_energy_joules_total":
                phases["idle"] = phases.get("idle", 0.0) + value
    devices = [
        DeviceLine(
            name,
            gpu_source.get(name, "") or "gpu",
            gpu_power.get(name),
            energy,
            tuple(sorted(by_device.get(name, []), key=lambda w: -w[2])),
        )
        for name, energy in sorted(gpu_energy.items(), key=lambda item: int(item[0][3:]))
    ]
    for name, energy in sorted(cpu_energy.items()):
        source = cpu_source.get(name, "")
        devices.append(
            DeviceLine(name, "estimate" if source == "model" else source, cpu_power.get(name), energy, tuple())
        )
    return devices, phases


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def request_line(item: dict[str, Any]) -> RequestLine:
    """One request of the aggregator's API (``/api/v1/requests/{id}`` shape); its energy is the ``active`` view."""
    energy = item.get("energy_j")
    active = _number(energy.get("active")) if isinstance(energy, dict) else None
    return RequestLine(
        str(item.get("request_id", "")),
        str(item.get("model", "")),
        int(item.get("input_tokens") or 0),
        int(item.get("output_tokens") or 0),
        str(item.get("status", "")),
        active,
        _number(item.get("joules_per_output_token")),
    )


def model_line(item: dict[str, Any]) -> ModelLine:
    """One group of ``/api/v1/summary?by=model``."""
    return ModelLine(
        str(item.get("group", "")),
        int(item.get("count") or 0),
        _number(item.get("energy_j")) or 0.0,
        _number(item.get("joules_per_output_token")),
    )


def _items(payload: Any, key: str) -> list[dict[str, Any]] | None:
    """The objects listed under ``key`` of an API answer; None when the answer is not there or not that shape."""
    if isinstance(payload, dict):
        payload = payload.get(key)
    if isinstance(payload, list):
        return [item for item in payload if isinstance(item, dict)]
    return None


class RequestsLog:
    """The synthetic server's JSON lines of finished requests, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.count = 0
        self.last: list[dict[str, Any]] = []

    def read_new(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line still being written
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.count += 1
                self.last.append(record)
        del self.last[:-LAST_REQUESTS]


class Telemetry:
    """Takes a ``Snapshot`` from the agent at ``agent_url`` and the aggregator at ``api_url`` (``http://host:port``)."""

    def __init__(self, agent_url: str, api_url: str, requests_log: Path, since_ns: int) -> None:
        """``since_ns``: this run's start (Unix ns); a kept data dir holds earlier runs' requests too."""
        self.agent_url = agent_url
        self.api_url = api_url
        self.since_ns = since_ns
        self.log = RequestsLog(requests_log)

    def snapshot(self) -> Snapshot:
        snap = Snapshot()
        text = get_text(self.agent_url + "/metrics")
        if text is not None:
            try:
                snap.devices, snap.phases = parse_agent_metrics(text)
                snap.agent_up = True
            except ValueError:
                pass
        self.log.read_new()
        snap.served = self.log.count
        window = f"since={self.since_ns}"
        answered = _items(get_json(f"{self.api_url}/api/v1/requests?{window}&limit={LAST_REQUESTS}"), "requests")
        if answered is not None:
            snap.request_api = True
            snap.requests = [request_line(item) for item in answered]
            models = _items(get_json(f"{self.api_url}/api/v1/summary?by=model&{window}"), "groups")
            snap.models = [model_line(item) for item in models or []]
        else:
            snap.requests = [
                RequestLine(
                    str(r.get("request_id", "")),
                    str(r.get("model", "")),
                    int(r.get("input_tokens") or 0),
                    int(r.get("output_tokens") or 0),
                    "sent",
                )
                for r in reversed(self.log.last)
            ]
        return snap
