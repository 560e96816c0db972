"""Training steps end to end: client processes call collector.client.step() against the real agent (simulated
GPUs, a fake RAPL tree), and /metrics counts them under each process's workload, beside its energy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.test_agent_process import REPO, AgentProcess, scrape
from tests.fakes.ports import free_port
from tests.fakes.powercap import FakePowercap, typical_server

REGISTERED = """
import collector.client as client
client.register("e2e-steps", phase="training", job="77")
for _ in range(1000):
    client.step()
with client._client._lock:  # not while the watcher has a flush's count in hand
    print(client.steps_sent + client._client.steps_pending, client.steps_dropped, flush=True)  # the rest go at exit
"""

# Named by its environment, not by registering; it lives on (and uses CPU) so that scans see it.
UNREGISTERED = """
import time
import collector.client as client
for _ in range(500):
    client.step()
end = time.monotonic() + 30
while time.monotonic() < end:
    sum(range(10000))
"""


def steps_by_labels(url: str) -> dict[tuple[str, str, str], float]:
    return {
        (labels["workload"], labels["phase"], labels["job"]): value
        for labels, value in scrape(url).get("wattmeter_workload_steps_total", [])
    }


def test_steps_reach_metrics_under_each_processes_workload(tmp_path: Path) -> None:
    fake_rapl: FakePowercap = typical_server(tmp_path / "root", packages=1)
    port = free_port()
    socket_path = tmp_path / "agent.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[prometheus]\nlisten = "127.0.0.1:{port}"\n[sources.nvml]\nenabled = false\n'
        f'[sources.rapl]\nroot = "{fake_rapl.class_dir}"\n[workloads]\ninterval_s = 0.5\n'
        f'[api]\nsocket = "{socket_path}"\n'
    )
    agent = AgentProcess(config, "--simulate-gpus", "2")
    url = f"http://127.0.0.1:{port}"
    worker = None
    try:
        agent.wait_healthy(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
        env.update({"WATTMETER_SOCKET": str(socket_path), "PYTHONPATH": str(REPO)})
        done = subprocess.run([sys.executable, "-c", REGISTERED], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["1000", "0"]
        assert "not reachable" not in done.stderr
        worker_env = {**env, "WATTMETER_WORKLOAD": "e2e-env", "WATTMETER_PHASE": "training", "WATTMETER_JOB": "9"}
        worker = subprocess.Popen([sys.executable, "-c", UNREGISTERED], env=worker_env)

        zone = fake_rapl.zones["0"]
        registered, named = ("e2e-steps", "training", "77"), ("e2e-env", "training", "9")
        deadline = time.monotonic() + 30
        steps: dict[tuple[str, str, str], float] = {}
        while time.monotonic() < deadline:
            fake_rapl.set_energy(zone, zone.energy_uj + 2_000_000)  # the package draws, so workloads get energy
            time.sleep(0.2)
            steps = steps_by_labels(url)
            # the env-named worker's first flush may hold only part of its 500 (the rest go a second later)
            if steps.get(registered) == 1000.0 and steps.get(named) == 500.0:
                break
        assert steps.get(registered) == 1000.0, steps
        assert steps.get(named) == 500.0, steps
        assert ("unresolved", "unknown", "") not in steps

        # the live process's steps and energy share their labels: J per step is one PromQL division
        samples = scrape(url)
        energy = {
            (labels["workload"], labels["phase"], labels["job"])
            for labels, value in samples["wattmeter_workload_energy_joules_total"]
            if value > 0
        }
        deadline = time.monotonic() + 15
        while ("e2e-env", "training", "9") not in energy and time.monotonic() < deadline:
            fake_rapl.set_energy(zone, zone.energy_uj + 2_000_000)
            time.sleep(0.3)
            energy = {
                (labels["workload"], labels["phase"], labels["job"])
                for labels, value in scrape(url)["wattmeter_workload_energy_joules_total"]
                if value > 0
            }
        assert ("e2e-env", "training", "9") in energy
    finally:
        if worker is not None:
            worker.kill()
            worker.wait(5)
        agent.kill()
