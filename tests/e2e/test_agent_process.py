"""The real agent as a subprocess: scraped over HTTP, checked by promtool, stopped by SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.ports import free_port
from tests.fakes.powercap import FakePowercap, typical_server

REPO = Path(__file__).resolve().parents[2]


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class AgentProcess:
    def __init__(self, config: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collector", "agent", "--config", str(config), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_healthy(self, url: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited early:\n{self.proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if get(url + "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("agent did not become healthy")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def fake_rapl(tmp_path: Path) -> FakePowercap:
    return typical_server(tmp_path / "root", packages=1)


@pytest.fixture
def agent(tmp_path: Path, fake_rapl: FakePowercap) -> Iterator[tuple[AgentProcess, str]]:
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[prometheus]
listen = "127.0.0.1:{port}"

[sources.nvml]
enabled = false

[sources.rapl]
root = "{fake_rapl.class_dir}"
interval_s = 0.1

[sources.simulated]
interval_s = 0.1

[api]
socket = "{tmp_path / "agent.sock"}"
"""
    )
    process = AgentProcess(config, "--simulate-gpus", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_healthy(url)
        yield process, url
    finally:
        process.kill()


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, body = get(url + "/metrics")
    assert status == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape_until(url: str, ready: Callable[[Samples], bool], timeout_s: float = 15.0) -> Samples:
    """Scrape until ``ready`` says the samples are there (a loaded machine reads late); the last scrape either way,
    for the test's own assertions to say what was missing."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def _cpu(samples: Samples) -> dict[tuple[str, str, str], float]:
    return {
        (lb["package"], lb["domain"], lb["source"]): v for lb, v in samples.get("wattmeter_cpu_energy_joules_total", [])
    }


def test_scrape_has_gpus_cpu_and_health(agent: tuple[AgentProcess, str], fake_rapl: FakePowercap) -> None:
    _, url = agent
    first = scrape_until(
        url,
        lambda s: (
            len(s.get("wattmeter_source_up", [])) == 4
            and len(s.get("wattmeter_gpu_energy_joules_total", [])) == 2
            and ("0", "dram", "rapl") in _cpu(s)
        ),
    )
    gpus = {labels["gpu"] for labels, _ in first["wattmeter_gpu_energy_joules_total"]}
    assert gpus == {"0", "1"}
    assert all(labels.keys() == {"gpu", "uuid", "model"} for labels, _ in first["wattmeter_gpu_power_watts"])
    cpu = _cpu(first)
    assert cpu[("0", "package", "rapl")] == pytest.approx(10.0)  # the fake tree's 10,000,000 uJ
    assert cpu[("0", "dram", "rapl")] == pytest.approx(2.0)
    assert ("0", "package", "model") not in cpu  # RAPL is readable, so no estimate
    up = {lb["source"]: v for lb, v in first["wattmeter_source_up"]}
    assert up == {"rapl": 1.0, "simulated": 1.0, "workloads": 1.0, "api": 1.0}
    assert first["wattmeter_build_info"][0][0]["version"]

    fake_rapl.set_energy(fake_rapl.zones["0"], fake_rapl.zones["0"].energy_uj + 3_500_000)
    second = scrape_until(url, lambda s: _cpu(s).get(("0", "package", "rapl"), 0.0) > 10.0)
    assert _cpu(second)[("0", "package", "rapl")] == pytest.approx(13.5)
    before = {lb["gpu"]: v for lb, v in first["wattmeter_gpu_energy_joules_total"]}
    after = {lb["gpu"]: v for lb, v in second["wattmeter_gpu_energy_joules_total"]}
    assert all(after[g] > before[g] for g in before)  # simulated GPUs draw at least ~70 W


def test_promtool_check_metrics_is_clean(agent: tuple[AgentProcess, str]) -> None:
    _, url = agent
    assert shutil.which("promtool"), "promtool missing: `make test` installs Debian's prometheus package"
    # past one slow (status) read, so every metric family is present
    scrape_until(url, lambda s: "wattmeter_gpu_power_limit_watts" in s)
    status, body = get(url + "/metrics")
    assert status == 200
    assert b"wattmeter_gpu_power_limit_watts" in body
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b"", result.stdout + result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_within_two_seconds(agent: tuple[AgentProcess, str], signum: int) -> None:
    process, _ = agent
    begun = time.monotonic()
    process.proc.send_signal(signum)
    code = process.proc.wait(timeout=5)
    elapsed = time.monotonic() - begun
    assert code == 0
    assert elapsed < 2.0, elapsed


def test_cpu_estimate_when_no_rapl(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[prometheus]\nlisten = "127.0.0.1:{port}"\n[sources.nvml]\nenabled = false\n'
        f'[sources.rapl]\nroot = "{tmp_path / "no-powercap"}"\n[sources.cpu_model]\ninterval_s = 0.1\n'
        f'[api]\nsocket = "{tmp_path / "agent.sock"}"\n'
    )
    process = AgentProcess(config)
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_healthy(url)
        samples = scrape_until(url, lambda s: "wattmeter_cpu_energy_joules_total" in s)
        sources = {lb["source"] for lb, _ in samples["wattmeter_cpu_energy_joules_total"]}
        assert sources == {"model"}
        assert "wattmeter_gpu_energy_joules_total" not in samples
    finally:
        process.kill()


BURNER = """
import time
import collector.client as client
client.register("e2e-finetune", phase="training", job="77")
end = time.monotonic() + 4.0
while time.monotonic() < end:
    sum(range(10000))
"""


def test_a_registered_process_gets_its_cpu_energy(tmp_path: Path, fake_rapl: FakePowercap) -> None:
    port = free_port()
    socket_path = tmp_path / "agent.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[prometheus]\nlisten = "127.0.0.1:{port}"\n[sources.nvml]\nenabled = false\n'
        f'[sources.rapl]\nroot = "{fake_rapl.class_dir}"\n[workloads]\ninterval_s = 0.5\n'
        f'[api]\nsocket = "{socket_path}"\n'
    )
    process = AgentProcess(config, "--simulate-gpus", "1")
    url = f"http://127.0.0.1:{port}"
    burner = None
    try:
        process.wait_healthy(url)
        assert socket_path.is_socket()
        env = {**os.environ, "WATTMETER_SOCKET": str(socket_path), "PYTHONPATH": str(REPO)}
        burner = subprocess.Popen([sys.executable, "-c", BURNER], env=env)
        zone = fake_rapl.zones["0"]
        deadline = time.monotonic() + 15
        found: list[tuple[dict[str, str], float]] = []
        while time.monotonic() < deadline and not found:
            fake_rapl.set_energy(zone, zone.energy_uj + 2_000_000)  # the package draws 2 J per step
            time.sleep(0.2)
            samples = scrape(url)
            found = [
                (labels, value)
                for labels, value in samples.get("wattmeter_workload_energy_joules_total", [])
                if labels["workload"] == "e2e-finetune" and value > 0
            ]
        assert found, "the registered process never got energy"
        labels, _ = found[0]
        assert labels["phase"] == "training" and labels["job"] == "77" and labels["device"] == "cpu0"
        phases = {lb["phase"]: v for lb, v in samples["wattmeter_phase_energy_joules_total"]}
        assert phases.get("training", 0.0) > 0
    finally:
        if burner is not None:
            burner.kill()
            burner.wait(5)
        process.kill()
