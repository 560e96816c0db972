"""6. Workload attribution's cost: the agent with 8 simulated GPUs (16 GPU processes) and RAPL at 10 Hz, and a
process scan at 1 Hz over a host with 2,000 extra sleeping processes; plus the scan and the per-reading split
measured in process.

The agent runs through this module (``python -m bench.workloads agent CONFIG OUT``): the agent as ``wattmeter
agent`` builds it, plus a simulated source with 2 processes per GPU (an option the config file does not offer),
and on exit it writes the tracker's scan durations to OUT.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK,
    SAMPLE_INTERVAL_S,
    SIMULATED_GPUS,
    BenchError,
    Context,
    ManagedProcess,
    Result,
    check,
    clean_env,
    cpu_delta,
    cpu_sample,
    free_port,
    stopping,
)

NAME = "workloads"
TARGET_CPU_S_PER_S = 0.01  # 1% of one core, attribution included
HOST_PROCESSES = 2000
PROCESSES_PER_GPU = 2  # 16 GPU processes over 8 GPUs
SCAN_INTERVAL_S = 1.0
FIRST_SCANS_S = 3.0  # the first scans open every stat file; they are not the steady state
IN_PROCESS_SCANS = 30
IN_PROCESS_READINGS = 2000
READINGS_PER_SCAN = 10  # of each device: 10 Hz readings, 1 Hz scans
SPAWN_HEADROOM = 512  # processes left to the user under RLIMIT_NPROC


# --------------------------------------------------------------------------------------------------------------
# The host's sleeping processes


def spawn_sleepers(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` ``sleep`` processes (bounded by RLIMIT_NPROC less headroom); the caller kills them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and count > soft - SPAWN_HEADROOM:
        raise BenchError(f"ulimit -u is {soft}: too low for {count} extra processes")
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            sleepers.append(
                subprocess.Popen(
                    ["sleep", "900"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
    except BaseException:
        kill_all(sleepers)
        raise
    return sleepers


def kill_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.kill()
    for proc in processes:
        proc.wait()


def host_processes() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


# --------------------------------------------------------------------------------------------------------------
# The agent


def write_config(workdir: Path, rapl_class_dir: Path, port: int) -> Path:
    config = workdir / "agent-workloads.toml"
    config.write_text(
        'log_level = "warning"\n\n'
        f'[prometheus]\nlisten = "{LOOPBACK}:{port}"\n\n'
        "[sources.nvml]\nenabled = false\n\n"
        f'[sources.rapl]\nroot = "{rapl_class_dir}"\ninterval_s = {SAMPLE_INTERVAL_S}\n\n'
        "[sources.simulated]\ngpus = 0\n\n"  # added by agent_main, with PROCESSES_PER_GPU
        f'[api]\nsocket = "{workdir / "agent-workloads.sock"}"\n\n'
        f"[workloads]\nenabled = true\ninterval_s = {SCAN_INTERVAL_S}\n"
    )
    return config


def agent_main(config_path: str, out_path: str) -> int:
    """The agent of ``wattmeter agent --config CONFIG`` plus 8 simulated GPUs with 2 processes each."""
    from collector.agent import Agent
    from collector.config import load_config
    from collector.sampler import SourceState
    from collector.sources.simulated import SimulatedSource

    config = load_config(Path(config_path), environ={})
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(config)
    source = SimulatedSource(SIMULATED_GPUS, SAMPLE_INTERVAL_S, processes_per_gpu=PROCESSES_PER_GPU)
    source.open()
    state = SourceState(source)
    agent.sampler.states.append(state)
    agent.sampler.mark_opened(state)
    code = agent.run()
    tracker = agent.workloads
    if tracker is not None:
        report = {
            "scan_durations_s": tracker.scan_durations_s,
            "errors": tracker.errors_total,
            "series": tracker.energy.series_count,
        }
        Path(out_path).write_text(json.dumps(report))
    return code


def start_agent(ctx: Context) -> tuple[ManagedProcess, Path]:
    port = free_port()
    config = write_config(ctx.workdir, ctx.rapl.class_dir, port)
    out = ctx.workdir / "agent-workloads.json"
    argv = [sys.executable, "-m", "bench.workloads", "agent", str(config), str(out)]
    proc = ManagedProcess(NAME, argv, ctx.workdir / "agent-workloads.log", port, "/healthz", env=clean_env())
    try:
        proc.wait_ready()
    except BenchError:
        proc.stop()
        raise
    return proc, out


# --------------------------------------------------------------------------------------------------------------
# In process


def scan_cost(max_open: int | None) -> tuple[float, int, int]:
    """(p50 seconds per scan, processes, stat files open) of ``ProcessTable.scan`` over this host's /proc."""
    from collector.workloads.procfs import ProcessTable

    table = ProcessTable(Path("/proc"), max_open=max_open)
    try:
        table.scan()  # opens the stat files
        durations = []
        count = 0
        for _ in range(IN_PROCESS_SCANS):
            started = time.perf_counter()
            count = len(table.scan())
            durations.append(time.perf_counter() - started)
        return statistics.median(durations), count, table.open_files()
    finally:
        table.close()


def split_cost(eager: bool) -> float:
    """Seconds per device reading of the tracker's split: 8 simulated GPUs with 2 processes each and one CPU
    package shared by 4 workloads, readings pre-made so only the split is timed. ``eager``: with a split listener
    (as the stream and carbon pricing add), each reading is split as it comes; without, readings are taken in and
    split at a flush, here once every 10 readings of each device (the 1 Hz scan), its cost included."""
    from collector.attribution import gpu_process_shares
    from collector.config import WorkloadsConfig
    from collector.readings import DeviceKind, DeviceReading
    from collector.sampler import Sampler
    from collector.sources.simulated import SimulatedSource
    from collector.workloads.tracker import WorkloadTracker

    source = SimulatedSource(SIMULATED_GPUS, SAMPLE_INTERVAL_S, cpu=True, processes_per_gpu=PROCESSES_PER_GPU)
    source.open()
    sampler = Sampler([source])
    state = sampler.states[0]
    sampler.mark_opened(state)
    tracker = WorkloadTracker(WorkloadsConfig(), sampler)
    for info in state.devices:
        tracker.splitter.add_device(info.device_id, info.kind)
    for status in source.read_status():
        shares = gpu_process_shares(status.processes, lambda p: (p.workload, p.phase, p.job))
        tracker.splitter.set_gpu_shares(status.device_id, shares)
    cpu_keys = {(f"cpu-workload-{k}", "unknown", ""): float(k + 1) for k in range(4)}
    for info in state.devices:
        if info.kind is not DeviceKind.GPU:
            tracker.splitter.set_cpu_shares(info.device_id, cpu_keys, 100.0)
    base = time.monotonic_ns()
    batches = [
        [DeviceReading(info.device_id, 10.0 * n, 100.0, base + n * 100_000_000, 0) for info in state.devices]
        for n in range(IN_PROCESS_READINGS // len(state.devices) + 1)
    ]
    if eager:
        tracker.add_split_listener(lambda reading, split, counted: None)
    started = time.perf_counter()
    for number, batch in enumerate(batches, 1):
        tracker.on_readings(source.name, batch)
        if number % READINGS_PER_SCAN == 0:
            tracker.flush()
    tracker.flush()
    elapsed = time.perf_counter() - started
    return elapsed / sum(len(b) for b in batches)


# --------------------------------------------------------------------------------------------------------------
# The benchmark


def run(ctx: Context) -> list[Result]:
    d = ctx.durations
    sleepers = spawn_sleepers(HOST_PROCESSES)
    try:
        processes = host_processes()
        agent, out = start_agent(ctx)
        with stopping(agent):
            time.sleep(max(d.warmup_s, FIRST_SCANS_S))
            agent.check_alive()
            before = cpu_sample(agent.pid)
            time.sleep(d.overhead_window_s)
            idle = cpu_delta(before, cpu_sample(agent.pid))
            agent.check_alive()
            agent.proc.send_signal(signal.SIGTERM)
            try:
                agent.proc.wait(10)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"the agent did not stop:\n{agent.log_tail()}") from exc
        try:
            report: dict[str, Any] = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            raise BenchError(f"no scan report from the agent ({exc}):\n{agent.log_tail()}") from exc
        # steady state only: the scans of the measured window, not the first ones that open every stat file
        scans = report["scan_durations_s"][-max(1, int(d.overhead_window_s / SCAN_INTERVAL_S)) :]
        agent_scan_s = statistics.median(scans)
        cached_s, scanned, kept_open = scan_cost(None)
        uncached_s, scanned_uncached, _ = scan_cost(0)
    finally:
        kill_all(sleepers)
    reading_s = split_cost(eager=False)
    eager_reading_s = split_cost(eager=True)
    readings_per_s = (SIMULATED_GPUS + ctx.rapl.zones) / SAMPLE_INTERVAL_S  # what the agent splits
    target = f"< {TARGET_CPU_S_PER_S:g} CPU-s/s"
    setting = (
        f"{SIMULATED_GPUS} GPUs x {PROCESSES_PER_GPU} processes + RAPL at 10 Hz, "
        f"scan at {SCAN_INTERVAL_S:g} Hz over {processes} processes"
    )
    return [
        Result(
            NAME,
            f"agent CPU with attribution, idle, {setting}, CPU-s per wall-s",
            round(idle.per_wall_s, 5),
            "CPU-s/s",
            target,
            check(idle.per_wall_s, "<", TARGET_CPU_S_PER_S),
            idle.to_json() | {"percent_of_one_core": 100 * idle.per_wall_s, "host_processes": processes},
        ),
        Result(
            NAME,
            "agent's process scan, p50 wall time per scan (steady state; other threads' turns included)",
            round(agent_scan_s * 1e3, 3),
            "ms",
            details={
                "scans": len(scans),
                "p90_ms": round(sorted(scans)[int(0.9 * (len(scans) - 1))] * 1e3, 3),
                "us_per_process": round(agent_scan_s / processes * 1e6, 2),
                "errors": report.get("errors"),
                "series": report.get("series"),
            },
        ),
        Result(NAME, "agent's process scan, per process", round(agent_scan_s / processes * 1e6, 2), "us"),
        Result(
            NAME,
            f"in-process scan, stat and schedstat kept open, p50 ({scanned} processes)",
            round(cached_s * 1e3, 3),
            "ms",
            details={"us_per_process": round(cached_s / scanned * 1e6, 2), "descriptors_kept_open": kept_open},
        ),
        Result(
            NAME,
            f"in-process scan, open+read+close each, p50 ({scanned_uncached} processes)",
            round(uncached_s * 1e3, 3),
            "ms",
            details={"us_per_process": round(uncached_s / scanned_uncached * 1e6, 2)},
        ),
        *(
            Result(
                NAME,
                f"in-process split per device reading (2 workloads per GPU, 4 on the CPU), {how}",
                round(seconds * 1e6, 2),
                "us",
                details={"agent_readings_per_s": readings_per_s, "cpu_s_per_s": seconds * readings_per_s},
            )
            for how, seconds in (
                ("split at 1 Hz flushes", reading_s),
                ("each split as it comes (a split listener: stream, carbon)", eager_reading_s),
            )
        ),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "agent":
        sys.exit(agent_main(sys.argv[2], sys.argv[3]))
    sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'bench.workloads'} agent CONFIG OUT")
