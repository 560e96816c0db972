"""Writes the Wattmeter Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists below.

    python deploy/grafana/dashboards.py          # rewrite the JSON files
    python deploy/grafana/dashboards.py --check  # exit 1 if a committed file differs from what this writes

Standard library only. Every panel and target reads the datasource through the ``datasource`` variable, never a uid,
so the dashboards work with whatever Prometheus the provisioning (or an import) gives them. Every expression is run
against a real Prometheus scraping a real agent and aggregator by tests/deploy/test_dashboards.py.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# workload energy is split on every device, parts of a package (core, uncore) and the whole platform (psys)
# included: summing a workload over devices takes GPUs, packages and DRAM only, so nothing is counted twice
SUMMED_DEVICES = 'device!~"psys|.+-core|.+-uncore"'


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    heatmap: bool = False


@dataclass
class Panel:
    title: str
    kind: str  # timeseries | stat | bargauge | piechart | heatmap | table
    targets: list[Target]
    width: int
    height: int
    unit: str = ""
    description: str = ""
    stacked: bool = False
    time_from: str = ""  # a relative range of its own: "now/d" is today so far
    decimals: int | None = None
    mappings: list[dict[str, Any]] = field(default_factory=list)
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)


def query_variable(name: str, label: str, query: str, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,  # on time range change: hosts and GPUs come and go
        "sort": 3,  # numerical ascending: GPU 2 before GPU 10
        "multi": multi,
        "includeAll": multi,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {},
        "options": [],
        "hide": 0,
    }


DATASOURCE_VARIABLE = {
    "name": "datasource",
    "label": "Prometheus",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
    "options": [],
    "refresh": 1,
    "hide": 0,
}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit} if panel.unit else {}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.mappings:
        defaults["mappings"] = panel.mappings
    if panel.thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"value": value, "color": color} for value, color in panel.thresholds],
        }
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 60 if panel.stacked else 10,
            "lineWidth": 1,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
            "showPoints": "never",
        }
    options: dict[str, Any] = {}
    if panel.kind in ("stat", "bargauge", "piechart"):
        options["reduceOptions"] = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if panel.kind == "stat":
        options.update({"colorMode": "value", "graphMode": "area", "textMode": "auto"})
    if panel.kind == "bargauge":
        options.update({"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True})
    if panel.kind == "piechart":
        options.update(
            {"pieType": "donut", "legend": {"displayMode": "table", "placement": "right", "values": ["percent"]}}
        )
    if panel.kind == "timeseries":
        options["legend"] = {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "lastNotNull"]}
        options["tooltip"] = {"mode": "multi", "sort": "desc"}
    if panel.kind == "heatmap":
        options.update(
            {
                "calculate": False,
                "yAxis": {"unit": panel.unit},
                "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange"},
                "cellGap": 1,
            }
        )
    targets = []
    for index, target in enumerate(panel.targets):
        entry: dict[str, Any] = {
            "refId": chr(ord("A") + index),
            "datasource": DATASOURCE,
            "expr": target.expr,
            "legendFormat": target.legend or "__auto",
            "range": not target.instant,
            "instant": target.instant,
        }
        if target.heatmap:
            entry["format"] = "heatmap"
        targets.append(entry)
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.time_from:
        body["timeFrom"] = panel.time_from
        body["hideTimeOverride"] = False
    return body


def dashboard_json(
    uid: str, title: str, description: str, variables: list[dict[str, Any]], panels: list[Panel]
) -> dict[str, Any]:
    laid_out = []
    x = y = row_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        laid_out.append(panel_json(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["wattmeter", "energy"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [DATASOURCE_VARIABLE, *variables]},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["wattmeter"], "asDropdown": True, "title": "Wattmeter", "includeVars": True}
        ],
        "panels": laid_out,
    }


UP_MAPPINGS = [
    {"type": "value", "options": {"0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}
]
RED_BELOW_1: list[tuple[float | None, str]] = [(None, "red"), (1.0, "green")]


def fleet() -> dict[str, Any]:
    phase = '{phase=~"$phase"}'
    panels = [
        Panel(
            "Power now",
            "stat",
            [Target("sum(host:wattmeter_power_watts:rate1m)")],
            6,
            5,
            "watt",
            "All hosts: GPUs and CPU packages, mean of the last minute (host:wattmeter_power_watts:rate1m).",
        ),
        Panel(
            "Energy today",
            "stat",
            [Target("sum(increase(wattmeter_fleet_energy_joules_total[$__range])) / 3.6e6", instant=True)],
            6,
            5,
            "kwatth",
            "Since midnight in the dashboard's time zone.",
            time_from="now/d",
            decimals=2,
        ),
        Panel(
            "Energy this month",
            "stat",
            [Target("sum(increase(wattmeter_fleet_energy_joules_total[$__range])) / 3.6e6", instant=True)],
            6,
            5,
            "kwatth",
            "Since the first of the month.",
            time_from="now/M",
            decimals=1,
        ),
        Panel(
            "CO2 today",
            "stat",
            [Target("sum(increase(wattmeter_fleet_co2_grams_total[$__range])) / 1000", instant=True)],
            6,
            5,
            "masskg",
            "Emissions of the energy used today, where the aggregator has [carbon] configured (no data without it).",
            time_from="now/d",
            decimals=2,
        ),
        Panel(
            "Power by phase",
            "timeseries",
            [Target(f"sum by (phase) (host_phase:wattmeter_power_watts:rate1m{phase})", "{{phase}}")],
            16,
            9,
            "watt",
            "Training, inference and unknown workloads; idle GPUs, system (CPU time of no "
            "workload) and other (workloads folded past max_series).",
            stacked=True,
        ),
        Panel(
            "Training vs inference",
            "piechart",
            [
                Target(
                    'sum by (phase) (increase(wattmeter_fleet_energy_joules_total{phase=~"training|inference"}'
                    "[$__range])) / 3.6e6",
                    "{{phase}}",
                    instant=True,
                )
            ],
            8,
            9,
            "kwatth",
            "Energy over the dashboard's time range.",
        ),
        Panel(
            "Power by host",
            "timeseries",
            [Target("sort_desc(sum by (host) (host_phase:wattmeter_power_watts:rate1m" + phase + "))", "{{host}}")],
            12,
            9,
            "watt",
            stacked=True,
        ),
        Panel(
            "Top workloads by energy",
            "bargauge",
            [
                Target(
                    "topk(10, sum by (workload, phase) (increase(wattmeter_workload_energy_joules_total{"
                    + SUMMED_DEVICES
                    + ',workload!~"system|other",phase=~"$phase"}[$__range]))) / 3.6e6',
                    "{{workload}} ({{phase}})",
                    instant=True,
                )
            ],
            12,
            9,
            "kwatth",
            "Over the dashboard's time range, from the agents: GPU, CPU package and DRAM energy of each workload.",
        ),
        Panel(
            "CO2 by workload",
            "bargauge",
            [
                Target(
                    "topk(10, sum by (workload) (increase(wattmeter_workload_co2_grams_total[$__range]))) / 1000",
                    "{{workload}}",
                    instant=True,
                )
            ],
            12,
            8,
            "masskg",
            "Where the aggregator has [carbon] configured.",
        ),
        Panel(
            "Agents streaming",
            "timeseries",
            [
                Target("sum(wattmeter_aggregator_agents_connected)", "streams open"),
                Target("count(wattmeter_stream_connected == 1)", "agents acknowledged"),
            ],
            12,
            8,
            "none",
            "Streams open on the aggregators, and agents whose stream is acknowledging.",
        ),
    ]
    return dashboard_json(
        "wattmeter-fleet",
        "Wattmeter / Fleet",
        "Power and energy of the whole fleet, by phase and workload.",
        [query_variable("phase", "Phase", "label_values(wattmeter_fleet_energy_joules_total, phase)")],
        panels,
    )


def host() -> dict[str, Any]:
    gpu = '{host=~"$host",gpu=~"$gpu"}'
    on_host = '{host=~"$host"}'
    panels = [
        Panel(
            "GPU power",
            "timeseries",
            [
                Target(f"wattmeter_gpu_power_watts{gpu}", "{{host}} GPU {{gpu}}"),
                Target(f"max by (host) (wattmeter_gpu_power_limit_watts{gpu})", "{{host}} power limit"),
            ],
            16,
            9,
            "watt",
            "Instant power of each GPU (10 Hz in the agent, the latest at each scrape) and the "
            "highest enforced power limit.",
        ),
        Panel(
            "GPU energy",
            "bargauge",
            [
                Target(
                    f"increase(wattmeter_gpu_energy_joules_total{gpu}[$__range]) / 3.6e6",
                    "{{host}} GPU {{gpu}}",
                    instant=True,
                )
            ],
            8,
            9,
            "kwatth",
            "Over the dashboard's time range, from the GPUs' energy counters.",
        ),
        Panel(
            "Power by workload",
            "timeseries",
            [
                Target(
                    'sum by (workload) (rate(wattmeter_workload_energy_joules_total{host=~"$host",'
                    + SUMMED_DEVICES
                    + ',phase=~"$phase"}[$__rate_interval]))',
                    "{{workload}}",
                ),
                Target(f"sum(rate(wattmeter_idle_energy_joules_total{on_host}[$__rate_interval]))", "idle GPUs"),
            ],
            24,
            9,
            "watt",
            "GPU, CPU package and DRAM power of each workload, stacked with the GPUs' idle "
            "power; system is CPU time of no workload.",
            stacked=True,
        ),
        Panel(
            "CPU and DRAM (RAPL)",
            "timeseries",
            [
                Target(
                    f"rate(wattmeter_cpu_energy_joules_total{on_host}[$__rate_interval])",
                    "{{host}} {{domain}} {{package}} ({{source}})",
                )
            ],
            12,
            8,
            "watt",
            "Each RAPL domain: package, its core and uncore parts, DRAM, psys (the platform); "
            'source="model" is an estimate from CPU utilisation, where RAPL is not readable.',
        ),
        Panel(
            "GPU utilisation and temperature",
            "timeseries",
            [
                Target(f"wattmeter_gpu_utilization_ratio{gpu} * 100", "{{host}} GPU {{gpu}} busy %"),
                Target(f"wattmeter_gpu_temperature_celsius{gpu}", "{{host}} GPU {{gpu}} °C"),
            ],
            12,
            8,
            "none",
        ),
        Panel(
            "Sources",
            "stat",
            [Target(f"wattmeter_source_up{on_host}", "{{host}} {{source}}", instant=True)],
            8,
            6,
            "none",
            "1: the source's last read succeeded.",
            mappings=UP_MAPPINGS,
            thresholds=RED_BELOW_1,
        ),
        Panel(
            "GPUs up",
            "stat",
            [Target(f"wattmeter_gpu_up{gpu}", "{{host}} GPU {{gpu}}", instant=True)],
            8,
            6,
            "none",
            "0: the GPU failed its reads (lost, or NVML errors); its energy stays at its last total.",
            mappings=UP_MAPPINGS,
            thresholds=RED_BELOW_1,
        ),
        Panel(
            "Source errors",
            "bargauge",
            [
                Target(
                    f"increase(wattmeter_source_errors_total{on_host}[$__range])", "{{host}} {{source}}", instant=True
                )
            ],
            8,
            6,
            "none",
            "Failed reads and device errors over the dashboard's time range.",
            thresholds=[(None, "green"), (1.0, "orange")],
        ),
        Panel(
            "Stream to the aggregator",
            "timeseries",
            [
                Target(f"wattmeter_stream_lag_seconds{on_host}", "{{host}} lag"),
                Target(f"wattmeter_stream_connected{on_host}", "{{host}} connected"),
            ],
            12,
            7,
            "s",
            "Age of the oldest unacknowledged batch; connected is 1 while batches are acknowledged.",
        ),
        Panel(
            "Spool",
            "timeseries",
            [Target(f"wattmeter_stream_spool_bytes{on_host}", "{{host}}")],
            12,
            7,
            "bytes",
            "Batches on disk not yet acknowledged (plus the segment being written).",
        ),
    ]
    return dashboard_json(
        "wattmeter-host",
        "Wattmeter / Host",
        "One host's GPUs, CPU and DRAM, workloads and the agent's health.",
        [
            query_variable("host", "Host", "label_values(wattmeter_build_info, host)"),
            query_variable("gpu", "GPU", 'label_values(wattmeter_gpu_energy_joules_total{host=~"$host"}, gpu)'),
            query_variable(
                "phase", "Phase", 'label_values(wattmeter_workload_energy_joules_total{host=~"$host"}, phase)'
            ),
        ],
        panels,
    )


def requests() -> dict[str, Any]:
    model = '{model=~"$model"}'
    panels = [
        Panel(
            "Joules per request, p50 and p95",
            "timeseries",
            [
                Target(
                    'model_view:wattmeter_request_energy_joules:p50_rate5m{model=~"$model",view="full"}',
                    "{{model}} p50",
                ),
                Target(
                    'model_view:wattmeter_request_energy_joules:p95_rate5m{model=~"$model",view="full"}',
                    "{{model}} p95",
                ),
            ],
            16,
            9,
            "joule",
            "Each request's energy with its share of idle (view=full), over 5-minute windows.",
        ),
        Panel(
            "Requests per second",
            "stat",
            [Target(f"sum(rate(wattmeter_requests_total{model}[$__rate_interval]))")],
            4,
            9,
            "reqps",
        ),
        Panel(
            "Pending",
            "stat",
            [Target("sum(wattmeter_requests_pending)")],
            4,
            9,
            "none",
            "Requests waiting for the samples past their end (final after finalize_grace_s at the latest).",
        ),
        Panel(
            "Joules per output token",
            "timeseries",
            [Target(f"model:wattmeter_energy_per_output_token_joules:rate5m{model}", "{{model}}")],
            12,
            8,
            "joule",
        ),
        Panel(
            "Request energy",
            "heatmap",
            [
                Target(
                    'sum by (le) (increase(wattmeter_request_energy_joules_bucket{model=~"$model",view="full"}'
                    "[$__rate_interval]))",
                    "{{le}}",
                    heatmap=True,
                )
            ],
            12,
            8,
            "joule",
            "How many requests used how much energy (view=full), per time slot.",
        ),
        Panel(
            "Top tenants by energy",
            "bargauge",
            [
                Target(
                    "topk(10, sum by (tenant) (increase(wattmeter_request_energy_joules_total"
                    + model
                    + "[$__range])))",
                    "{{tenant}}",
                    instant=True,
                )
            ],
            12,
            8,
            "joule",
            "Request energy over the dashboard's time range.",
        ),
        Panel(
            "Requests by model",
            "timeseries",
            [Target(f"sum by (model) (rate(wattmeter_requests_total{model}[$__rate_interval]))", "{{model}}")],
            12,
            8,
            "reqps",
        ),
    ]
    return dashboard_json(
        "wattmeter-requests",
        "Wattmeter / Requests",
        "Energy per inference request, per model and tenant.",
        [query_variable("model", "Model", "label_values(wattmeter_requests_total, model)")],
        panels,
    )


BUILTIN_VARIABLE = re.compile(r"\$__\w+")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)$")


def variables_used(text: str) -> set[str]:
    """The dashboard variables ``text`` refers to ($name, ${name}, ${name:fmt}, [[name]]), Grafana's $__ ones aside."""
    return {next(g for g in match.groups() if g) for match in VARIABLE.finditer(BUILTIN_VARIABLE.sub("", text))}


def expand(text: str, values: dict[str, str], builtins: dict[str, str]) -> str:
    """``text`` with Grafana's built-in variables ($__rate_interval, $__range, ...) and the dashboard variables
    replaced by the values given (a regex of the chosen values, as Grafana writes a multi-value variable)."""
    text = BUILTIN_VARIABLE.sub(lambda match: builtins[match.group(0)], text)
    return VARIABLE.sub(lambda match: values[next(g for g in match.groups() if g)], text)


def all_values(values: list[str]) -> str:
    """A multi-value variable's values as Grafana's Prometheus datasource writes them into a query: a regex
    alternation, each value's regex metacharacters escaped for a PromQL string (a doubled backslash)."""
    return "(" + "|".join(re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", value) for value in values) + ")"


def label_values_query(query: str) -> tuple[str | None, str]:
    """(series selector or None, label) of a ``label_values(...)`` variable query."""
    match = LABEL_VALUES.match(query.strip())
    if match is None:
        raise ValueError(f"not a label_values() query: {query}")
    return match.group(1), match.group(2)


DASHBOARDS = {"wattmeter-fleet.json": fleet, "wattmeter-host.json": host, "wattmeter-requests.json": requests}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, ensure_ascii=False) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    files = render()
    if argv[1:] == ["--check"]:
        stale = [
            name
            for name, text in files.items()
            if not (OUT_DIR / name).is_file() or (OUT_DIR / name).read_text() != text
        ]
        for name in stale:
            print(f"{OUT_DIR / name} is stale: run python deploy/grafana/dashboards.py", file=sys.stderr)
        return 1 if stale else 0
    if argv[1:]:
        print("usage: dashboards.py [--check]", file=sys.stderr)
        return 2
    OUT_DIR.mkdir(exist_ok=True)
    for name, text in files.items():
        (OUT_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
