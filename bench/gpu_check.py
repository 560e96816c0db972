"""Real-GPU check: the agent's NVML energy against nvidia-smi's instant power, over idle, training-like and
inference-like phases. Run through bench/gpu_check.sh on a machine with an NVIDIA GPU; never in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

LOAD = r"""
import os, sys, time, torch
phase, seconds = sys.argv[1], float(sys.argv[2])
dev = torch.device("cuda:0")
end = time.monotonic() + seconds
if phase == "training":
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    while time.monotonic() < end:
        for _ in range(20):
            c = a @ b
        torch.cuda.synchronize()
else:
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    while time.monotonic() < end:
        x = torch.randn(8, 4096, device=dev, dtype=torch.bfloat16)  # many small batches
        for _ in range(32):
            x = torch.tanh(x @ w)
        torch.cuda.synchronize()
        time.sleep(0.002)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("wattmeter_gpu_energy_joules_total{") or line.startswith("wattmeter_gpu_power_watts{"):
            name = line.split("{", 1)[0]
            gpu = re.search(r'gpu="(\d+)"', line)
            if gpu and gpu.group(1) == "0":
                values[name] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(("wattmeter_workload_energy_joules_total{", "wattmeter_idle_energy_joules_total{")):
            if 'device="gpu0"' not in line:
                continue
            value = float(line.rsplit(" ", 1)[1])
            workload = re.search(r'workload="([^"]*)"', line)
            name = f"workload:{workload.group(1)}" if workload else "idle"
            values[name] = values.get(name, 0.0) + value
            values["attributed"] = values.get("attributed", 0.0) + value
    return values


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--load-s", type=float, default=40.0)
    args = parser.parse_args()
    out: Path = args.out
    port = free_port()
    env = {**os.environ, "WATTMETER_SOURCES__RAPL__ENABLED": "false", "WATTMETER_SOURCES__CPU_MODEL__ENABLED": "false"}
    agent_log = open(out / "agent.log", "w")  # noqa: SIM115 - the agent writes it until the end
    agent = subprocess.Popen(
        [sys.executable, "-m", "collector", "agent", "--listen", f"127.0.0.1:{port}", "--log-level", "info"],
        env=env,
        stdout=agent_log,
        stderr=subprocess.STDOUT,
    )
    smi = subprocess.Popen(
        [
            "nvidia-smi",
            "-i",
            "0",
            "--query-gpu=timestamp,power.draw,power.draw.instant",
            "--format=csv,nounits",
            "-lms",
            "100",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    smi_rows: list[tuple[float, float]] = []  # (monotonic s, instant W)

    def read_smi() -> None:
        assert smi.stdout is not None
        for line in smi.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                smi_rows.append((time.monotonic(), float(parts[2] if parts[2] not in ("[N/A]", "") else parts[1])))
            except (ValueError, IndexError):
                continue

    threading.Thread(target=read_smi, daemon=True).start()
    url = f"http://127.0.0.1:{port}/metrics"
    scrapes: list[tuple[float, dict[str, float]]] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.wait(1.0):
            with contextlib.suppress(OSError):
                scrapes.append((time.monotonic(), scrape(url)))

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if scrape(url).get("wattmeter_gpu_energy_joules_total") is not None:
                break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        print("agent did not export GPU energy; agent.log:")
        print((out / "agent.log").read_text())
        return 1
    threading.Thread(target=scraper, daemon=True).start()
    phases: list[tuple[str, float, float]] = []

    def run_phase(name: str, seconds: float) -> None:
        start = time.monotonic()
        if name == "idle":
            time.sleep(seconds)
        else:
            load_env = {**os.environ, "WATTMETER_WORKLOAD": f"gpu-check-{name}", "WATTMETER_PHASE": name}
            subprocess.run([sys.executable, "-c", LOAD, name, str(seconds)], env=load_env, check=False)
        phases.append((name, start, time.monotonic()))

    run_phase("idle", args.idle_s)
    run_phase("training", args.load_s)
    run_phase("inference", args.load_s)
    time.sleep(2)
    stop.set()
    agent.terminate()
    smi.terminate()
    agent.wait(5)

    with open(out / "scrapes.csv", "w") as handle:
        handle.write("t_s,energy_j,power_w\n")
        for t, values in scrapes:
            handle.write(
                f"{t:.3f},{values.get('wattmeter_gpu_energy_joules_total')},{values.get('wattmeter_gpu_power_watts')}\n"
            )
    energies = [v["wattmeter_gpu_energy_joules_total"] for _, v in scrapes if "wattmeter_gpu_energy_joules_total" in v]
    monotonic_ok = all(b >= a for a, b in itertools.pairwise(energies))

    def energy_at(t: float) -> float | None:
        before = [(ts, v["wattmeter_gpu_energy_joules_total"]) for ts, v in scrapes if ts <= t]
        after = [(ts, v["wattmeter_gpu_energy_joules_total"]) for ts, v in scrapes if ts >= t]
        if not before or not after:
            return None
        (t0, e0), (t1, e1) = before[-1], after[0]
        return e0 if t1 == t0 else e0 + (e1 - e0) * (t - t0) / (t1 - t0)

    def smi_energy(t0: float, t1: float) -> float:
        rows = [r for r in smi_rows if t0 <= r[0] <= t1]
        return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in itertools.pairwise(rows))

    print("\nphase       seconds  wattmeter_J  nvidia-smi_J  ratio  mean_W")
    for name, t0, t1 in phases:
        # trim 2 s at each edge: scrape and nvidia-smi timestamps are both taken here, but 1 s apart at worst
        a, b = t0 + 2, t1 - 2
        e0, e1 = energy_at(a), energy_at(b)
        ref = smi_energy(a, b)
        if e0 is None or e1 is None or ref <= 0:
            print(f"{name:10s}  {b - a:7.1f}  n/a")
            continue
        joules = e1 - e0
        print(f"{name:10s}  {b - a:7.1f}  {joules:11.1f}  {ref:12.1f}  {joules / ref:5.3f}  {joules / (b - a):6.1f}")
    print(f"\nenergy counter never decreased: {monotonic_ok} ({len(energies)} scrapes)")
    # conservation on the real card: workloads + idle on gpu0 against the GPU's own energy, over the run
    with_split = [v for _, v in scrapes if "attributed" in v and "wattmeter_gpu_energy_joules_total" in v]
    if len(with_split) >= 2:
        first, last = with_split[0], with_split[-1]
        device_j = last["wattmeter_gpu_energy_joules_total"] - first["wattmeter_gpu_energy_joules_total"]
        split_j = last["attributed"] - first["attributed"]
        print(f"\nworkloads + idle on gpu0: {split_j:.1f} J against the GPU's {device_j:.1f} J", end="")
        print(f" (ratio {split_j / device_j:.6f})" if device_j > 0 else "")
        for name in sorted(k for k in last if k.startswith("workload:") or k == "idle"):
            print(f"  {name:40s} {last[name] - first.get(name, 0.0):10.1f} J")
    else:
        print("\nno workload series on gpu0 (is [workloads] enabled?)")
    print("per-request energy: not yet (issue 5)")
    print(f"agent log: {out / 'agent.log'}")
    return 0 if monotonic_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
