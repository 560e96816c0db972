"""Training steps and workload labels end to end: a real agent process (a simulated GPU, a fake RAPL tree) streams
to a real aggregator process over loopback gRPC; a client process registers with labels {"flexible": "true"} and
calls collector.client.step() N times. The aggregator's SQLite store then holds N steps and the label for its
workload, and ``wattmeter report --format json`` shows J per step and the workload as flexible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector.store.sqlite import SqliteStore
from tests.e2e.test_stream_pipeline import REPO, AggregatorProcess, Process, poll
from tests.fakes.ports import free_port
from tests.fakes.powercap import FakePowercap, typical_server

STEPS = 300
HOST = "e2e-steps-host"
WORKLOAD = ("e2e-flex", "inference", "5")
HOUR_NS = 3600 * 10**9
FAR = 2**62

# Registers (inference: flexible by its label alone), steps, then uses CPU a while so that the agent's scans see it
# and book it package energy; the client flushes its steps about once a second and at exit.
CLIENT = f"""
import time
import collector.client as client
client.register({WORKLOAD[0]!r}, phase={WORKLOAD[1]!r}, job={WORKLOAD[2]!r}, labels={{"flexible": "true"}})
for _ in range({STEPS}):
    client.step()
end = time.monotonic() + 6
while time.monotonic() < end:
    sum(range(10000))
"""


def iso(t_ns: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t_ns // 10**9, tz=timezone.utc).isoformat()


def test_steps_and_labels_reach_the_store_and_the_report(tmp_path: Path) -> None:
    started_ns = time.time_ns()
    aggregator = AggregatorProcess(tmp_path)
    aggregator.start()
    fake_rapl: FakePowercap = typical_server(tmp_path / "root", packages=1)
    port = free_port()
    socket_path = tmp_path / "agent.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[prometheus]\nlisten = "127.0.0.1:{port}"\n[sources.nvml]\nenabled = false\n'
        f'[sources.rapl]\nroot = "{fake_rapl.class_dir}"\n[sources.simulated]\ngpus = 1\n'
        f'[workloads]\ninterval_s = 0.5\n[api]\nsocket = "{socket_path}"\n'
        f'[stream]\ntarget = "{aggregator.target}"\nbatch_interval_s = 0.5\nspool_dir = "{tmp_path / "spool"}"\n'
        f'hostname = "{HOST}"\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0\n'
    )
    agent = Process("agent", ["agent", "--config", str(config)], tmp_path / "agent.log", f"http://127.0.0.1:{port}")
    client = None
    try:
        agent.wait_healthy()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
        env.update({"WATTMETER_SOCKET": str(socket_path), "PYTHONPATH": str(REPO)})
        client = subprocess.Popen([sys.executable, "-c", CLIENT], env=env)
        zone = fake_rapl.zones["0"]
        store = SqliteStore(aggregator.db)
        try:

            def stored() -> bool:
                fake_rapl.set_energy(zone, zone.energy_uj + 2_000_000)  # the package draws: the client gets some
                steps = {(r.hostname, r.workload, r.phase, r.job): r.steps for r in store.workload_steps(0, FAR)}
                labels = {(r.hostname, r.workload, r.phase, r.job): r.labels for r in store.workload_labels()}
                energy = {(r.hostname, r.workload, r.phase, r.job): r.energy_j for r in store.workload_energy(0, FAR)}
                key = (HOST, *WORKLOAD)
                return steps.get(key) == STEPS and labels.get(key) == {"flexible": "true"} and energy.get(key, 0) > 0

            assert aggregator.current is not None
            poll(stored, "the client's steps, label and energy in the store", agent, aggregator.current)
            assert client.wait(30) == 0
            time.sleep(1.5)  # a last flush of the agent: nothing counted twice
            rows = [r for r in store.workload_steps(0, FAR) if (r.workload, r.phase, r.job) == WORKLOAD]
            assert [(r.hostname, r.steps) for r in rows] == [(HOST, STEPS)]
        finally:
            store.close()

        now_ns = time.time_ns()
        since, until = started_ns - started_ns % HOUR_NS, now_ns - now_ns % HOUR_NS + HOUR_NS
        done = subprocess.run(
            [sys.executable, "-m", "collector", "report", "--storage", f"sqlite:///{aggregator.db}",
             "--format", "json", "--since", iso(since), "--until", iso(until)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        (row,) = [s for s in report["step_power"] if (s["workload"], s["phase"], s["job"]) == WORKLOAD]
        assert row["host"] == HOST and row["steps"] == STEPS
        assert row["joules_per_step"] is not None and row["joules_per_step"] > 0
        assert row["joules_per_step"] == pytest.approx(row["energy_kwh"] * 3.6e6 / STEPS)
        flexible = {f["workload"]: f["reasons"] for f in report["flexible"]}
        assert flexible[WORKLOAD[0]] == ["label flexible=true"]
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(5)
        agent.kill()
        if aggregator.current is not None:
            aggregator.current.kill()
