"""The Grafana dashboards proven against a real Prometheus.

Debian's ``prometheus`` runs with the shipped scrape config (its targets pointed here, 1 s intervals) and the shipped
rules (evaluated every second), scraping a real ``wattmeter agent`` (two simulated GPUs, a fake RAPL tree whose
counters advance) that streams to a real ``wattmeter aggregator``, while a client process reports inference request
spans through the agent's socket. Every target of every panel is then run through ``/api/v1/query`` with the
dashboard's variables set to values Prometheus really has, and must return data; the rules must all be loaded and
healthy. Metrics still being built elsewhere (issue 5's request metrics, the carbon metrics) are detected by
whether the aggregator exports them: a target that needs one the aggregator does not export yet is skipped, saying
so, never passed.

The static checks on the dashboard JSON (ids, uids, datasources, variables) need no processes.
Set WATTMETER_RENDER_DOCS=<dir> to also draw the screenshots (deploy/grafana/render.py) from this run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.e2e.test_stream_pipeline import Process, http_get, poll
from tests.fakes.ports import free_port
from tests.fakes.powercap import FakePowercap, typical_server

REPO = Path(__file__).resolve().parents[2]
GRAFANA_DIR = REPO / "deploy" / "grafana"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
HOST = "e2e-host"
SCRAPE_S = 1
DATA_WAIT_S = 45.0  # from the stack's start, for every panel to have data (a loaded 2-core VM)
# watts each fake RAPL zone draws
RAPL_WATTS = {"0": 95.0, "0:0": 60.0, "0:1": 9.0, "0:2": 14.0, "1": 240.0}

LOAD = """
import random, sys, time
import collector.client as client
rng = random.Random(6)
until = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < until:
    end = time.time_ns()
    n += 1
    client.report_span(
        f"dash-{n}", end - rng.randint(200, 2500) * 1_000_000, end,
        model=rng.choice(["llama-8b", "llama-8b", "mistral-7b"]), tenant=rng.choice(["acme", "globex", "initech"]),
        workload="sim-llama-8b-chat", input_tokens=rng.randint(50, 900), output_tokens=rng.randint(20, 400),
    )
    time.sleep(0.05)
"""


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


dashboards = load_module(GRAFANA_DIR / "dashboards.py")
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def targets() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(dashboard file, panel, target) of every target."""
    return [
        (path.name, panel, target)
        for path in DASHBOARD_FILES
        for panel in load_dashboard(path)["panels"]
        for target in panel["targets"]
    ]


# --------------------------------------------------------------------------------------------------------------
# Static checks


def test_dashboard_files_are_the_generators_output() -> None:
    assert [p.name for p in DASHBOARD_FILES] == sorted(dashboards.DASHBOARDS)
    assert dashboards.main(["dashboards.py", "--check"]) == 0, "run: python deploy/grafana/dashboards.py"


def test_panel_ids_and_dashboard_uids_are_unique() -> None:
    uids = []
    for path in DASHBOARD_FILES:
        board = load_dashboard(path)
        uids.append(board["uid"])
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), (path.name, panel["title"])
    assert len(uids) == len(set(uids)) == 3


def test_no_datasource_uid_is_hard_coded() -> None:
    def datasources(node: Any) -> Iterator[Any]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield value
                else:
                    yield from datasources(value)
        elif isinstance(node, list):
            for item in node:
                yield from datasources(item)

    for path in DASHBOARD_FILES:
        board = load_dashboard(path)
        found = list(datasources(board["panels"])) + list(datasources(board["templating"]))
        assert found
        assert all(ds == {"type": "prometheus", "uid": "${datasource}"} for ds in found), path.name
        (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
        assert (variable["name"], variable["query"]) == ("datasource", "prometheus")


def test_every_variable_used_exists_and_the_issues_variables_are_there() -> None:
    seen: set[str] = set()
    for path in DASHBOARD_FILES:
        board = load_dashboard(path)
        defined = [variable["name"] for variable in board["templating"]["list"]]
        seen.update(defined)
        texts = [json.dumps(board["panels"])] + [json.dumps(v.get("query", "")) for v in board["templating"]["list"]]
        for text in texts:
            missing = dashboards.variables_used(text) - set(defined)
            assert not missing, f"{path.name}: {missing} used, not defined"
        # a variable refers only to variables before it (Grafana resolves them in order)
        for index, variable in enumerate(board["templating"]["list"]):
            used = dashboards.variables_used(json.dumps(variable.get("query", "")))
            assert used <= set(defined[:index]), (path.name, variable["name"])
    assert {"datasource", "host", "gpu", "phase", "model"} <= seen


def test_provisioning_files() -> None:
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "wattmeter.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "${DS_PROMETHEUS_URL}"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "wattmeter.yml").read_text())
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"]


# --------------------------------------------------------------------------------------------------------------
# The live stack


def query(base: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    status, body = http_get(f"{base}/api/v1/query?{urllib.parse.urlencode(params)}")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (expr, answer)
    result = answer["data"]["result"]
    assert isinstance(result, list)
    return result


def ready(url: str) -> bool:
    try:
        return http_get(url, timeout_s=2.0)[0] == 200
    except OSError:  # not listening yet
        return False


class RaplLoad:
    """Advances the fake RAPL counters as if the zones drew RAPL_WATTS, until stopped."""

    def __init__(self, tree: FakePowercap) -> None:
        self.tree = tree
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fake-rapl", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.1):
            now = time.monotonic()
            for zone_id, watts in RAPL_WATTS.items():
                zone = self.tree.zones[zone_id]
                zone.energy_uj += int(watts * (now - last) * 1e6)
                # one write over the old digits, never a truncation: a reader in between would see an empty file
                # (the fake's set_energy truncates first; sysfs changes a value at once)
                fd = os.open(zone.path / "energy_uj", os.O_WRONLY)
                try:
                    os.pwrite(fd, f"{zone.energy_uj}\n".encode(), 0)
                finally:
                    os.close(fd)
            last = now

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


class PrometheusProcess(Process):
    """Debian's prometheus, with the log and process handling of the wattmeter processes."""

    def __init__(self, binary: str, args: list[str], log_path: Path, http_url: str) -> None:
        self.name, self.http_url, self.log_path = "prometheus", http_url, log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, *args], cwd=log_path.parent, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )


@dataclass
class Stack:
    prometheus: str
    agent: str
    aggregator: str
    started: float
    rule_count: int
    processes: list[Process] = field(default_factory=list)

    def builtins(self) -> dict[str, str]:
        elapsed = max(int(time.monotonic() - self.started), 5)
        return {"$__rate_interval": "5s", "$__interval": "2s", "$__range": f"{elapsed}s"}


def fast_rules(tmp_path: Path) -> tuple[list[Path], int]:
    """The shipped rule files with every group evaluated each second."""
    paths, count = [], 0
    for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")):
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            group["interval"] = f"{SCRAPE_S}s"
            count += len(group["rules"])
        target = tmp_path / path.name
        target.write_text(yaml.safe_dump(rules, sort_keys=False))
        paths.append(target)
    return paths, count


def prometheus_config(tmp_path: Path, agent: str, aggregator: str, rules: list[Path]) -> Path:
    """The shipped prometheus.yml, its targets here: the agent through file_sd (as a host's file would name it),
    the aggregator static."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    config["rule_files"] = [str(path) for path in rules]
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "agents.yml").write_text(yaml.safe_dump([{"targets": [agent], "labels": {"host": HOST}}]))
    for job in config["scrape_configs"]:
        if job["job_name"] == "wattmeter-agent":
            del job["static_configs"]
            job["file_sd_configs"] = [{"files": [str(targets / "*.yml")], "refresh_interval": "1s"}]
        else:
            job["static_configs"] = [{"targets": [aggregator]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def aggregator_config(tmp_path: Path, grpc_port: int, http_port: int) -> Path:
    from collector.aggregator.config import AggregatorConfig

    text = f"""
[grpc]
listen = "127.0.0.1:{grpc_port}"
[http]
listen = "127.0.0.1:{http_port}"
[storage]
url = "sqlite:///{tmp_path / "aggregator.db"}"
[ingest]
workers = 0
"""
    fields = AggregatorConfig.model_fields
    if "requests" in fields:
        text += "[requests]\ninterval_s = 0.5\nfinalize_grace_s = 3.0\n"
    if "carbon" in fields:
        text += "[carbon]\nintensity_g_per_kwh = 350.0\n"
    path = tmp_path / "aggregator.toml"
    path.write_text(text)
    return path


def agent_config(tmp_path: Path, port: int, rapl: FakePowercap, grpc_port: int) -> Path:
    from collector.config import AgentConfig

    carbon = "[carbon]\nintensity_g_per_kwh = 350.0\n" if "carbon" in AgentConfig.model_fields else ""
    path = tmp_path / "agent.toml"
    path.write_text(
        carbon
        + f"""
[prometheus]
listen = "127.0.0.1:{port}"
[sources.nvml]
enabled = false
[sources.rapl]
root = "{rapl.class_dir}"
[sources.simulated]
gpus = 2
[api]
socket = "{tmp_path / "agent.sock"}"
[stream]
target = "127.0.0.1:{grpc_port}"
spool_dir = "{tmp_path / "spool"}"
batch_interval_s = 0.25
fsync = "never"
hostname = "{HOST}"
"""
    )
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: `make test` installs Debian's prometheus package"
    tmp = tmp_path_factory.mktemp("dashboards")
    started = time.monotonic()
    rapl = typical_server(tmp / "root", packages=1)
    rapl_load = RaplLoad(rapl)
    grpc_port, http_port, agent_port, prometheus_port = (free_port() for _ in range(4))
    processes: list[Process] = []
    load: subprocess.Popen[bytes] | None = None
    try:
        aggregator = Process(
            "aggregator",
            ["aggregator", "--config", str(aggregator_config(tmp, grpc_port, http_port))],
            tmp / "aggregator.log",
            f"http://127.0.0.1:{http_port}",
        )
        processes.append(aggregator)
        agent = Process(
            "agent",
            ["agent", "--config", str(agent_config(tmp, agent_port, rapl, grpc_port))],
            tmp / "agent.log",
            f"http://127.0.0.1:{agent_port}",
        )
        processes.append(agent)
        for process in (aggregator, agent):
            process.wait_healthy()
        # Prometheus starts once the stream is acknowledging: a scrape before would see a target or stream down,
        # and the test asserts that no alert is even pending
        poll(
            lambda: b"\nwattmeter_stream_connected 1.0\n" in http_get(agent.http_url + "/metrics")[1],
            "the agent's stream acknowledged",
            aggregator,
            agent,
        )
        rules, rule_count = fast_rules(tmp)
        config = prometheus_config(tmp, f"127.0.0.1:{agent_port}", f"127.0.0.1:{http_port}", rules)
        prometheus = PrometheusProcess(
            binary,
            [
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            tmp / "prometheus.log",
            f"http://127.0.0.1:{prometheus_port}",
        )
        processes.append(prometheus)
        poll(lambda: ready(prometheus.http_url + "/-/ready"), "prometheus ready", prometheus)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
        env.update({"WATTMETER_SOCKET": str(tmp / "agent.sock"), "PYTHONPATH": str(REPO)})
        load = subprocess.Popen([sys.executable, "-c", LOAD, "600"], cwd=REPO, env=env)
        yield Stack(prometheus.http_url, agent.http_url, aggregator.http_url, started, rule_count, processes)
    finally:
        if load is not None:
            load.kill()
            load.wait(10)
        for process in reversed(processes):
            process.kill()
        rapl_load.close()


def variable_values(stack: Stack, board: dict[str, Any]) -> dict[str, str]:
    """Each query variable set as a dashboard opens (All: every value Prometheus has for it, as the regex Grafana
    writes), in the dashboard's order."""
    values: dict[str, str] = {"datasource": "prometheus"}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = dashboards.label_values_query(variable["query"]["query"])
        params = {} if selector is None else {"match[]": dashboards.expand(selector, values, stack.builtins())}

        def found(label: str = label, params: dict[str, str] = params) -> list[str]:
            status, body = http_get(f"{stack.prometheus}/api/v1/label/{label}/values?{urllib.parse.urlencode(params)}")
            assert status == 200, body
            return sorted(value for value in json.loads(body)["data"] if value)

        choices = poll(found, f"values of ${variable['name']}", *stack.processes, timeout_s=DATA_WAIT_S)
        values[variable["name"]] = dashboards.all_values(choices)
    return values


def test_agent_series_carry_the_host_of_the_aggregators_series(stack: Stack) -> None:
    def hosts() -> tuple[set[str], set[str]] | None:
        agent = {s["metric"].get("host", "") for s in query(stack.prometheus, "wattmeter_build_info")}
        fleet = {s["metric"]["host"] for s in query(stack.prometheus, "wattmeter_fleet_power_watts")}
        return (agent, fleet) if agent and fleet else None

    assert poll(hosts, "agent and fleet series", *stack.processes, timeout_s=DATA_WAIT_S) == ({HOST}, {HOST})


def test_rules_are_loaded_and_healthy(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        status, body = http_get(stack.prometheus + "/api/v1/rules")
        assert status == 200
        rules = [rule for group in json.loads(body)["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules) else None

    rules = poll(evaluated, "every rule evaluated", *stack.processes, timeout_s=DATA_WAIT_S)
    assert len(rules) == stack.rule_count
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    # nothing is wrong in this stack: no alert may be firing or pending
    assert [rule["name"] for rule in rules if rule["type"] == "alerting" and rule["state"] != "inactive"] == []


@pytest.mark.parametrize(
    ("board_file", "panel", "target"),
    targets(),
    ids=[f"{name[10:-5]}:{panel['title']}:{target['refId']}" for name, panel, target in targets()],
)
def test_panel_target_returns_data(
    stack: Stack, board_file: str, panel: dict[str, Any], target: dict[str, Any]
) -> None:
    board = load_dashboard(GRAFANA_DIR / "dashboards" / board_file)
    values = variable_values(stack, board)
    expr = dashboards.expand(target["expr"], values, stack.builtins())
    poll(
        lambda: query(stack.prometheus, dashboards.expand(target["expr"], values, stack.builtins())),
        f"data for {panel['title']!r}: {expr}",
        *stack.processes,
        timeout_s=max(1.0, DATA_WAIT_S - (time.monotonic() - stack.started)),
    )


@pytest.mark.skipif(not os.environ.get("WATTMETER_RENDER_DOCS"), reason="set WATTMETER_RENDER_DOCS=docs to draw")
def test_render_screenshots(stack: Stack) -> None:
    render = load_module(GRAFANA_DIR / "render.py")
    seconds = float(os.environ.get("WATTMETER_RENDER_SECONDS", "150"))
    time.sleep(max(0.0, seconds - (time.monotonic() - stack.started)))
    # the last part of the run: the first minute is the rules' 1-minute and 5-minute windows filling up
    shown = max(30.0, time.monotonic() - stack.started - 65.0)
    written = render.render_all(stack.prometheus, Path(os.environ["WATTMETER_RENDER_DOCS"]), shown)
    assert len(written) == len(DASHBOARD_FILES)
