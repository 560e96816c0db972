"""``wattmeter demo``: the load hook of the simulated GPUs, the view, and the real command run as a subprocess on
free ports (not a TTY): plain lines, exit 0, no process left; SIGINT; a child killed; a taken port.

The store assertion needs the aggregator's request engine (collector.aggregator.request_engine): it is skipped, and
says so, only while that module does not exist.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collector.demo.gpu_load import GpuLoadBoard
from collector.demo.telemetry import (
    DeviceLine,
    ModelLine,
    RequestLine,
    RequestsLog,
    Snapshot,
    model_line,
    parse_agent_metrics,
    request_line,
)
from collector.demo.view import LiveScreen, frame, plain_line
from collector.readings import GpuProcess
from collector.sources.simulated import IDLE_W, LOADED_PEAK_W, SimulatedSource
from tests.fakes.ports import free_port

REPO = Path(__file__).resolve().parents[1]
DURATION_S = 8
RUN_TIMEOUT_S = 90.0  # a generous bound for a loaded 2-core VM; the run takes ~15 s
STARTED = re.compile(r"^demo \d+ s( of \d+ s)? \|", re.MULTILINE)  # a periodic line: everything runs
ENGINE = importlib.util.find_spec("collector.aggregator.request_engine") is not None


# --------------------------------------------------------------------------------------------------------------
# The load hook and the board


class Clock:
    def __init__(self) -> None:
        self.ns = 10**9

    def __call__(self) -> int:
        return self.ns


def test_board_lists_live_declared_processes_and_skips_the_rest(tmp_path: Path) -> None:
    live = {101, 102}
    board = GpuLoadBoard(tmp_path, alive=lambda pid: pid in live)
    board.declare(0, 101, "python", 0.5, 1000)
    board.declare(0, 102, "python", 1.7, -5)  # clamped to 0-1 and >= 0
    board.declare(0, 103, "python", 0.5, 1000)  # not alive: a crashed workload's file
    board.declare(1, 101, "python", 0.25, 2000)
    (tmp_path / "gpu0" / "104.json").write_text("{torn")
    assert board.processes(0) == (GpuProcess(101, 1000, 0.5, "python"), GpuProcess(102, 0, 1.0, "python"))
    assert board.processes(1) == (GpuProcess(101, 2000, 0.25, "python"),)
    assert board.processes(7) == ()
    board.withdraw(0, 101)
    board.withdraw(0, 101)  # twice is fine
    assert [p.pid for p in board.processes(0)] == [102]


def test_simulated_gpu_power_follows_the_load_it_is_given() -> None:
    loads: dict[int, tuple[GpuProcess, ...]] = {0: (), 1: ()}
    clock = Clock()
    source = SimulatedSource(gpus=2, monotonic_ns=clock, load=lambda i: loads[i])
    source.open()
    source.read()
    loads[0] = (GpuProcess(os.getpid(), 10, 1.0, "python"),)
    loads[1] = (GpuProcess(4242, 10, 0.2, "a"), GpuProcess(4243, 10, 0.3, "b"))
    clock.ns += 10**9
    powers = {r.device_id: r.power_w for r in source.read()}
    assert powers["gpu0"] == pytest.approx(LOADED_PEAK_W, abs=2.0)
    assert powers["gpu1"] == pytest.approx(IDLE_W + 0.5 * (LOADED_PEAK_W - IDLE_W), abs=2.0)
    statuses = {s.device_id: s for s in source.read_status()}
    assert statuses["gpu1"].processes == loads[1]
    assert statuses["gpu1"].utilization_ratio == pytest.approx(0.5)
    loads[0] = ()
    clock.ns += 10**9
    idle = {r.device_id: r for r in source.read()}
    assert idle["gpu0"].power_w == pytest.approx(IDLE_W, abs=2.0)
    assert not {s.device_id: s for s in source.read_status()}["gpu0"].processes


# --------------------------------------------------------------------------------------------------------------
# The view


METRICS = """\
# TYPE wattmeter_gpu_energy_joules counter
wattmeter_gpu_energy_joules_total{gpu="0",model="Simulated H100 80GB HBM3",uuid="u0"} 1500.0
wattmeter_gpu_energy_joules_total{gpu="1",model="Simulated H100 80GB HBM3",uuid="u1"} 2500.0
# TYPE wattmeter_gpu_power_watts gauge
wattmeter_gpu_power_watts{gpu="0",model="Simulated H100 80GB HBM3",uuid="u0"} 400.0
# TYPE wattmeter_gpu_info gauge
wattmeter_gpu_info{gpu="0",source="simulated",uuid="u0",model="m"} 1.0
wattmeter_gpu_info{gpu="1",source="nvml",uuid="u1",model="m"} 1.0
# TYPE wattmeter_cpu_energy_joules counter
wattmeter_cpu_energy_joules_total{domain="package",package="0",source="model"} 300.0
wattmeter_cpu_energy_joules_total{domain="core",package="0",source="model"} 100.0
# TYPE wattmeter_workload_energy_joules counter
wattmeter_workload_energy_joules_total{device="gpu0",job="",phase="inference",workload="demo-inference"} 1200.0
wattmeter_workload_energy_joules_total{device="cpu0",job="",phase="",workload="system"} 250.0
# TYPE wattmeter_idle_energy_joules counter
wattmeter_idle_energy_joules_total{device="gpu0"} 300.0
wattmeter_idle_energy_joules_total{device="gpu1"} 100.0
# TYPE wattmeter_phase_energy_joules counter
wattmeter_phase_energy_joules_total{phase="inference"} 1200.0
"""


def test_agent_metrics_become_devices_and_phases() -> None:
    devices, phases = parse_agent_metrics(METRICS)
    assert devices == [
        DeviceLine("gpu0", "simulated", 400.0, 1500.0, (("demo-inference", "inference", 1200.0),)),
        DeviceLine("gpu1", "nvml", None, 2500.0),
        DeviceLine("cpu0", "estimate", None, 300.0),
    ]
    assert phases == {"inference": 1200.0, "idle": 400.0}


def test_requests_log_is_read_incrementally_with_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    log = RequestsLog(path)
    log.read_new()  # no file yet
    path.write_text(json.dumps({"request_id": "a"}) + "\n" + '{"request_id": "b"')
    log.read_new()
    assert (log.count, [r["request_id"] for r in log.last]) == (1, ["a"])
    with open(path, "a") as handle:
        handle.write("}\n")
    log.read_new()
    assert (log.count, [r["request_id"] for r in log.last]) == (2, ["a", "b"])


def test_views_show_devices_phases_and_requests() -> None:
    snap = Snapshot(
        devices=[DeviceLine("gpu0", "simulated", 412.0, 4120.0, (("demo-inference", "inference", 3900.0),))],
        phases={"inference": 3900.0, "idle": 220.0},
        agent_up=True,
        requests=[RequestLine("demo-1", "llama", 512, 128, "final", 45.25, 45.25 / 128)],
        request_api=True,
        served=3,
    )
    line = plain_line(snap, 12.0, 60.0)
    assert "gpu0 (simulated) 412 W 4.12 kJ" in line
    assert "phases: inference 3.90 kJ, idle 220.0 J" in line
    assert "3 served, last priced demo-1 llama 128 tokens 45.2 J 0.354 J/token (final)" in line
    waiting = plain_line(Snapshot(agent_up=False, served=2), 1.0, None)
    assert "agent not answering yet" in waiting and "waiting for the aggregator" in waiting
    lines = frame(snap, 12.0, None)
    assert any("demo-inference (inference) 3.90 kJ" in row for row in lines)
    assert any("demo-1" in row and "45.2 J" in row and "final" in row for row in lines)


def test_request_and_model_lines_read_the_aggregator_api_shapes() -> None:
    from collector.aggregator.http_api import request_json, summary_json
    from collector.store.base import RequestResult, RequestSummaryRow

    result = RequestResult("r1", "final", "llama", "acme", ("h",), 1, 2, 512, 128, 64.0, 80.0, 60.0, 3.0, 1.0)
    assert request_line(json.loads(json.dumps(request_json(result)))) == RequestLine(
        "r1", "llama", 512, 128, "final", 64.0, 0.5
    )
    pending = RequestResult("r2", "pending", "llama", input_tokens=5)
    assert request_line(json.loads(json.dumps(request_json(pending)))).energy_j is None
    row = RequestSummaryRow("llama", 3, 192.0, 60.0, 70.0, 384, 0.5)
    assert model_line(json.loads(json.dumps(summary_json(row)))) == ModelLine("llama", 3, 192.0, 0.5)


class Recorder:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_live_screen_redraws_in_place() -> None:
    out = Recorder()
    screen = LiveScreen(out, size=lambda: (80, 24))  # type: ignore[arg-type]
    screen.draw(["a", "b", "c"])
    assert "\x1b[" + "3F" not in out.text
    screen.draw(["d"])
    assert out.text.endswith("\x1b[3Fd\x1b[K\n\x1b[J")  # back over the 3 lines, rewrite, erase the rest
    screen.close()
    assert out.text.endswith("\x1b[?25h")


def test_live_screen_fits_lines_to_the_terminal() -> None:
    out = Recorder()
    screen = LiveScreen(out, size=lambda: (10, 4))  # type: ignore[arg-type]
    screen.draw(["\x1b[1mshort\x1b[0m", "a line longer than ten", "3", "4", "5"])
    assert out.text.endswith("\x1b[1mshort\x1b[0m\x1b[K\na line lo…\x1b[K\n3\x1b[K\n\x1b[J")  # 3 rows of 4
    screen.draw(["x"])
    assert "\x1b[3Fx" in out.text


# --------------------------------------------------------------------------------------------------------------
# The real command


def environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
    env["TMPDIR"] = str(tmp_path)  # the demo's temp dir lands here, to be found and checked
    return env


def processes_mentioning(text: str, besides: int = 0) -> list[int]:
    """Live processes whose command line holds ``text`` (every child of a demo names its directory), other than this
    one and ``besides``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = (Path("/proc") / entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry) not in (os.getpid(), besides):
            found.append(int(entry))
    return found


def demo_command(*extra: str) -> list[str]:
    ports = [free_port() for _ in range(3)]
    return [
        sys.executable,
        "-m",
        "collector",
        "demo",
        f"--agent-listen=127.0.0.1:{ports[0]}",
        f"--grpc-listen=127.0.0.1:{ports[1]}",
        f"--http-listen=127.0.0.1:{ports[2]}",
        *extra,
    ]


@dataclass
class DemoRun:
    code: int
    stdout: str
    stderr: str
    data_dir: Path
    children_seen: int
    left_over: list[int]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    tmp = tmp_path_factory.mktemp("demo")
    data_dir = tmp / "data"
    proc = subprocess.Popen(
        demo_command(f"--duration={DURATION_S}", f"--data-dir={data_dir}"),
        cwd=REPO,
        env=environment(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children_seen = 0
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        children_seen = max(children_seen, len(processes_mentioning(str(data_dir), besides=proc.pid)))
        time.sleep(0.5)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    yield DemoRun(proc.returncode, stdout, stderr, data_dir, children_seen, processes_mentioning(str(data_dir)))


@contextlib.contextmanager
def demo_process(tmp_path: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """``wattmeter demo`` started with its temp dir under ``tmp_path``; killed at the end if it still runs."""
    proc = subprocess.Popen(
        demo_command(*extra), cwd=REPO, env=environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_runs_for_its_duration_and_prints_plain_lines(finished_run: DemoRun) -> None:
    run = finished_run
    assert run.code == 0, run.stderr + run.stdout[-2000:]
    assert "\x1b[" not in run.stdout  # not a terminal: no ANSI
    agent_port = demo_port(run.stdout, "agent /metrics")
    assert f"http://127.0.0.1:{agent_port}/metrics" in run.stdout
    assert "/api/v1/requests" in run.stdout
    periodic = [line for line in run.stdout.splitlines() if STARTED.match(line)]
    assert len(periodic) >= 2, run.stdout
    last = periodic[-1]
    # both simulated GPUs measured, labelled simulated, with their workloads' phases counted
    assert re.search(r"gpu\d+ \(simulated\) \d+ W", last), last
    assert "training" in last and "inference" in last, last
    final = [line for line in run.stdout.splitlines() if line.startswith("demo ran ")]
    assert len(final) == 1 and re.search(r"requests: [1-9]\d* served", final[0]), run.stdout


def demo_port(stdout: str, label: str) -> int:
    match = re.search(rf"{re.escape(label)}\s+http://127\.0\.0\.1:(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def test_demo_leaves_no_process_and_keeps_its_data_dir(finished_run: DemoRun) -> None:
    run = finished_run
    assert run.children_seen == 4, "aggregator, agent, inference server and training job should have run"
    assert run.left_over == []
    assert (run.data_dir / "aggregator.db").is_file()
    assert (run.data_dir / "logs" / "agent.log").is_file()
    served = [json.loads(line) for line in (run.data_dir / "requests.jsonl").read_text().splitlines()]
    assert served and all(100 <= r["input_tokens"] <= 2000 for r in served)


@pytest.mark.skipif(
    not ENGINE, reason="the aggregator's request engine (collector.aggregator.request_engine) is absent"
)
def test_demo_requests_are_priced_in_the_store(finished_run: DemoRun) -> None:
    from collector.store.sqlite import SqliteStore

    served = {
        json.loads(line)["request_id"] for line in (finished_run.data_dir / "requests.jsonl").read_text().splitlines()
    }
    store = SqliteStore(finished_run.data_dir / "aggregator.db")
    try:
        results = store.requests(limit=10_000)
    finally:
        store.close()
    priced = [r for r in results if r.status in ("final", "approximate") and r.active_j is not None]
    assert priced, [(r.request_id, r.status) for r in results]
    assert {r.request_id for r in priced} <= served
    assert all(r.active_j is not None and r.active_j > 0 and r.model for r in priced)
    # and the demo showed them: the last priced request on its lines, the per-model totals at the end
    assert "last priced demo-" in finished_run.stdout
    assert re.search(r"^  llama-3\.1-8b-instruct: \d+ requests, [\d.]+ J", finished_run.stdout, re.MULTILINE)


def lines_until_running(proc: subprocess.Popen[str]) -> list[str]:
    """The demo's output up to its first periodic line (everything runs); killed when it takes too long."""
    watchdog = threading.Timer(RUN_TIMEOUT_S, proc.kill)
    watchdog.start()
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if STARTED.match(line):
                return lines
    finally:
        watchdog.cancel()
    raise AssertionError(f"the demo ended before running: {''.join(lines)}")


def test_sigint_stops_the_demo_cleanly(tmp_path: Path) -> None:
    with demo_process(tmp_path) as proc:
        lines = lines_until_running(proc)
        assert processes_mentioning(str(tmp_path)), "the demo's children should be running"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "removed at exit" in "".join(lines)
    assert processes_mentioning(str(tmp_path)) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("wattmeter-demo-")]  # the temp dir is gone


def test_a_child_that_dies_is_reported_and_the_demo_exits_1(tmp_path: Path) -> None:
    with demo_process(tmp_path) as proc:
        lines_until_running(proc)
        training = [pid for pid in processes_mentioning(str(tmp_path)) if b"demo.training" in cmdline(pid)]
        assert len(training) == 1
        os.kill(training[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "the training exited with code -9" in stderr
    assert processes_mentioning(str(tmp_path)) == []


def cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [arg for arg in demo_command() if not arg.startswith("--agent-listen")]
        result = subprocess.run(
            [*command, f"--agent-listen=127.0.0.1:{port}", "--duration=5"],
            cwd=REPO,
            env=environment(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port} (agent /metrics) is not free" in lines[0]
    assert "--agent-listen" in lines[0]
