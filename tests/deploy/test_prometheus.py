"""The shipped Prometheus files, checked by Debian's promtool: the config with its rules, the host relabelling on
real targets, and the promtool unit tests that make every alert fire (and stay quiet) with its annotations."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
AGENT_JOB = "wattmeter-agent"


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool missing: `make test` installs Debian's prometheus package"
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for path in RULES for group in load(path)["groups"] for rule in group["rules"] if "alert" in rule]


def test_the_shipped_files_are_there() -> None:
    assert [p.name for p in RULES] == ["wattmeter-alerts.yml", "wattmeter-recording.yml"]
    assert [p.name for p in UNIT_TESTS] == ["wattmeter-alerts.test.yml", "wattmeter-recording.test.yml"]


def test_config_with_its_rules_and_targets_is_valid(tmp_path: Path) -> None:
    """promtool check config on the shipped config, its /etc paths pointed at the repo's rules and targets, so the
    rule files it names are checked with it and the file_sd glob finds the example."""
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    for etc, here in (
        ("/etc/prometheus/rules/", f"{PROMETHEUS_DIR}/rules/"),
        ("/etc/prometheus/wattmeter-agents/", f"{PROMETHEUS_DIR}/targets/"),
    ):
        assert etc in text
        text = text.replace(etc, here)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_rules_are_valid_and_lint_clean() -> None:
    result = promtool("check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", *(p.name for p in UNIT_TESTS), cwd=PROMETHEUS_DIR / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS), result.stdout


def test_every_alert_is_unit_tested_firing_with_its_annotations() -> None:
    fired: dict[str, list[dict[str, Any]]] = {}
    for path in UNIT_TESTS:
        for case in load(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                fired.setdefault(check["alertname"], []).extend(check["exp_alerts"] or [])
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert set(rule["annotations"]) == {"summary", "description", "runbook"}, name
        assert fired.get(name), f"{name}: no promtool test makes it fire"
        for expected in fired[name]:
            assert set(expected["exp_annotations"]) == {"summary", "description", "runbook"}, name


def test_every_recording_rule_is_unit_tested() -> None:
    tested = "\n".join(
        check["expr"]
        for path in UNIT_TESTS
        for case in load(path)["tests"]
        for check in case.get("promql_expr_test", [])
    )
    records = [
        rule["record"]
        for path in RULES
        for group in load(path)["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]
    assert records
    for record in records:
        assert record in tested, f"{record}: no promtool test evaluates it"


def test_agent_targets_get_a_host_label(tmp_path: Path) -> None:
    """The agent job's relabelling, run by promtool on real targets: static ones (a name, an IPv6 address, no
    port) and the example file_sd file's entries (promtool's own file_sd run panics in 2.42, so they go in as
    static targets with their labels)."""
    config = load(PROMETHEUS_DIR / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == AGENT_JOB]
    groups = [{"targets": ["gpu-node-01:9750", "[fd00::1]:9750", "gpu-node-02"]}]
    groups += load(PROMETHEUS_DIR / "targets" / "wattmeter-agents.example.yml")
    job["static_configs"] = groups
    del job["file_sd_configs"]
    path = tmp_path / "sd.yml"
    path.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    result = promtool("check", "service-discovery", "--timeout=2s", str(path), AGENT_JOB)
    assert result.returncode == 0, result.stdout + result.stderr
    hosts = {target["labels"]["instance"]: target["labels"]["host"] for target in json.loads(result.stdout)}
    assert hosts == {
        "gpu-node-01:9750": "gpu-node-01",
        "[fd00::1]:9750": "fd00::1",
        "gpu-node-02:80": "gpu-node-02",
        "10.0.3.11:9750": "10.0.3.11",
        "10.0.3.12:9750": "10.0.3.12",
        "10.0.3.13:9750": "gpu-node-13",  # the targets file names it
    }


@pytest.mark.parametrize("name", ["wattmeter-alerts.yml", "wattmeter-recording.yml"])
def test_rules_use_only_metrics_wattmeter_exports_or_records(name: str) -> None:
    """A misspelt metric makes a rule silently empty: every wattmeter_* name in an expression is one the code
    defines (families in collector/), or a recorded name."""
    sources = "\n".join(p.read_text() for p in (REPO / "collector").rglob("*.py"))
    for group in load(PROMETHEUS_DIR / "rules" / name)["groups"]:
        for rule in group["rules"]:
            for metric in re.findall(r"(?<![:\w])(wattmeter_\w+)", rule["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", metric)
                known = f'"{base}"' in sources or f'"{metric}"' in sources
                assert known, f"{rule.get('alert') or rule.get('record')}: {metric} is not exported by Wattmeter"
