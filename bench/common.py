"""Shared pieces of the benchmarks: results, managed subprocesses, /proc CPU and memory readings, scraping."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIMULATED_GPUS = 8
SAMPLE_INTERVAL_S = 0.1  # 10 Hz for both the simulated GPUs and RAPL
NODE_EXPORTER_CANDIDATES = ("prometheus-node-exporter", "node_exporter")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
HTTP_TIMEOUT_S = 10.0


class BenchError(RuntimeError):
    """A benchmark could not run (a process did not start, a scrape failed, a tool is missing)."""


@dataclass
class Result:
    """One row of the results table."""

    benchmark: str
    metric: str
    value: float | int | str
    unit: str = ""
    target: str = ""  # human-readable, e.g. "< 0.01"; empty for informational rows
    passed: bool | None = None  # None: informational, no target
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check(value: float, op: str, limit: float) -> bool:
    if op == "<":
        return value < limit
    if op == "<=":
        return value <= limit
    raise ValueError(op)


# --------------------------------------------------------------------------------------------------------------
# /proc readings


@dataclass(frozen=True)
class CpuSample:
    """CPU time of one process at one instant.

    ``ticks_s`` is utime+stime from ``/proc/<pid>/stat``: every thread, dead ones included, in clock ticks
    (10 ms). ``threads_ns`` is each live thread's ``sum_exec_runtime`` from ``/proc/<pid>/task/*/schedstat``
    (nanoseconds), which is exact but forgets threads that have exited.
    """

    mono_s: float
    ticks_s: float
    threads_ns: dict[int, int]


def read_stat_ticks(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def read_thread_ns(pid: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{entry}/schedstat") as handle:
                out[int(entry)] = int(handle.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # thread exited between listdir and open
    return out


def cpu_sample(pid: int) -> CpuSample:
    mono = time.monotonic()
    threads = read_thread_ns(pid)
    ticks = read_stat_ticks(pid)
    return CpuSample(mono, ticks, threads)


@dataclass(frozen=True)
class CpuDelta:
    wall_s: float
    cpu_s: float  # the best figure: schedstat when exact, else ticks
    ticks_cpu_s: float
    method: str  # "schedstat" (exact) or "stat-ticks" (10 ms resolution)
    threads_before: int
    threads_after: int
    per_thread_cpu_s: dict[int, float]  # by thread id, in creation order (lowest id first); live threads only

    @property
    def per_wall_s(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"cpu_s_per_wall_s": self.per_wall_s}


def cpu_delta(before: CpuSample, after: CpuSample) -> CpuDelta:
    """CPU seconds between two samples. Exact (schedstat) when no thread exited in between: a thread that is new
    in ``after`` started after ``before`` was taken, so all of its runtime belongs to the window."""
    ticks = after.ticks_s - before.ticks_s
    if before.threads_ns and set(before.threads_ns) <= set(after.threads_ns):
        exact = sum(after.threads_ns.values()) - sum(before.threads_ns.values())
        cpu, method = exact / 1e9, "schedstat"
    else:
        cpu, method = ticks, "stat-ticks"
    return CpuDelta(
        wall_s=after.mono_s - before.mono_s,
        cpu_s=cpu,
        ticks_cpu_s=ticks,
        method=method,
        threads_before=len(before.threads_ns),
        threads_after=len(after.threads_ns),
        per_thread_cpu_s={
            tid: round((ns - before.threads_ns.get(tid, 0)) / 1e9, 6) for tid, ns in sorted(after.threads_ns.items())
        },
    )


def read_status_kib(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS etc. from /proc/<pid>/status, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key.startswith("Vm") or key in ("RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# --------------------------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class ManagedProcess:
    """A subprocess with its output in a log file; ``stop()`` terminates it, then kills it if it lingers."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        port: int,
        ready_path: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.port = port
        self.ready_path = ready_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Poll ``ready_path`` until it answers 200; returns the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                )
            try:
                status, _ = http_get(self.port, self.ready_path, timeout_s=1.0)
            except OSError as exc:
                last = str(exc)
            else:
                if status == 200:
                    return time.monotonic() - started
                last = f"HTTP {status}"
            time.sleep(0.05)
        raise BenchError(
            f"{self.name} not ready on {self.ready_path} after {timeout_s:.0f} s ({last}):\n{self.log_tail()}"
        )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT_S)
        finally:
            self._log.close()


def clean_env() -> dict[str, str]:
    """The bench's environment without WATTMETER_* (the agent's config comes from the file we write)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("WATTMETER_")}


@dataclass
class FakeRapl:
    class_dir: Path  # the agent's --rapl-root
    sysfs: Path  # node_exporter's --path.sysfs
    zones: int


def make_fake_rapl(root: Path) -> FakeRapl:
    from tests.fakes.powercap import typical_server

    tree = typical_server(root)
    return FakeRapl(tree.class_dir, tree.sysfs, len(tree.zones))


def start_agent(workdir: Path, rapl: FakeRapl, name: str = "agent", attempts: int = 3) -> ManagedProcess:
    """``wattmeter agent`` with 8 simulated GPUs at 10 Hz and RAPL on the fake tree at 10 Hz, no NVML."""
    last_error: BenchError | None = None
    for attempt in range(attempts):
        port = free_port()
        config = workdir / f"{name}.toml"
        config.write_text(
            'log_level = "warning"\n\n'
            f'[prometheus]\nlisten = "{LOOPBACK}:{port}"\n\n'
            "[sources.nvml]\nenabled = false\n\n"
            f'[sources.rapl]\nroot = "{rapl.class_dir}"\ninterval_s = {SAMPLE_INTERVAL_S}\n\n'
            f"[sources.simulated]\ngpus = {SIMULATED_GPUS}\ninterval_s = {SAMPLE_INTERVAL_S}\n\n"
            f'[api]\nsocket = "{workdir / f"{name}.sock"}"\n\n'
            # the agent-core figures (issue 2): sources, sampler and exporter; workload attribution is measured
            # on its own terms (16 GPU processes, 2,000 host processes) by its own benchmark
            "[workloads]\nenabled = false\n"
        )
        argv = [
            sys.executable, "-m", "collector", "agent",
            "--config", str(config),
            "--listen", f"{LOOPBACK}:{port}",
            "--simulate-gpus", str(SIMULATED_GPUS),
            "--rapl-root", str(rapl.class_dir),
            "--no-nvml",
        ]  # fmt: skip
        proc = ManagedProcess(name, argv, workdir / f"{name}-{attempt}.log", port, "/healthz", env=clean_env())
        try:
            proc.wait_ready()
            return proc
        except BenchError as exc:
            proc.stop()
            last_error = exc
            if "cannot serve metrics" not in str(exc):  # only a lost port race is worth another try
                break
    assert last_error is not None
    raise last_error


def node_exporter_path() -> str:
    for candidate in ("/usr/bin/prometheus-node-exporter", *NODE_EXPORTER_CANDIDATES):
        found = shutil.which(candidate)
        if found:
            return found
    raise BenchError("node_exporter not found (apt-get install prometheus-node-exporter)")


def node_exporter_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def start_node_exporter(
    workdir: Path, rapl: FakeRapl, extra_args: Sequence[str] = (), attempts: int = 3
) -> ManagedProcess:
    path = node_exporter_path()
    last_error: BenchError | None = None
    for attempt in range(attempts):
        port = free_port()
        argv = [
            path,
            "--collector.disable-defaults",
            "--collector.rapl",
            f"--path.sysfs={rapl.sysfs}",
            f"--web.listen-address={LOOPBACK}:{port}",
            *extra_args,
        ]
        log = workdir / f"node_exporter-{len(extra_args)}-{attempt}.log"
        proc = ManagedProcess("node_exporter", argv, log, port, "/metrics")
        try:
            proc.wait_ready()
            return proc
        except BenchError as exc:
            proc.stop()
            last_error = exc
            if "address already in use" not in str(exc):
                break
    assert last_error is not None
    raise last_error


# --------------------------------------------------------------------------------------------------------------
# Scraping


class Scraper:
    """GETs /metrics over one keep-alive connection (as Prometheus does) or a fresh connection per request."""

    def __init__(self, port: int, gzip_ok: bool = False, keep_alive: bool = True) -> None:
        self.port = port
        self.headers = {"Accept-Encoding": "gzip"} if gzip_ok else {}
        self.keep_alive = keep_alive
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None or not self.keep_alive:
            self.close()
            self._conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=HTTP_TIMEOUT_S)
            self._conn.connect()
        return self._conn

    def get(self, path: str = "/metrics") -> tuple[bytes, str]:
        """One GET; returns the raw body and its Content-Encoding."""
        conn = self._connection()
        try:
            conn.request("GET", path, headers=self.headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise BenchError(f"GET {path} on port {self.port} failed: {exc}") from exc
        if response.status != 200:
            self.close()
            raise BenchError(f"GET {path} on port {self.port}: HTTP {response.status}")
        if not self.keep_alive or response.will_close:
            self.close()
        return body, response.getheader("Content-Encoding", "") or ""

    def text(self, path: str = "/metrics") -> str:
        body, encoding = self.get(path)
        return (gzip.decompress(body) if encoding == "gzip" else body).decode()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Scraper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def series(text: str, prefix: str = "") -> int:
    """Samples in an exposition body (lines that are neither comments nor blank), optionally by name prefix."""
    return sum(1 for line in text.splitlines() if line and not line.startswith("#") and line.startswith(prefix))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def sleep_until(deadline_mono: float) -> None:
    delay = deadline_mono - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------------------------------------------
# The run's context


@dataclass
class Durations:
    warmup_s: float
    overhead_window_s: float
    prometheus_window_s: float
    prometheus_interval_s: float
    latency_requests: int
    latency_paced_requests: int
    latency_paced_interval_s: float
    latency_max_s: float  # cap per latency run
    rss_scrapes: int
    versus_scrapes: int
    versus_rate_hz: float
    versus_warmup_s: float
    render_iterations: int

    @classmethod
    def for_mode(cls, quick: bool) -> Durations:
        if quick:
            return cls(2.0, 10.0, 15.0, 15.0, 200, 30, 0.1, 20.0, 200, 100, 20.0, 1.0, 100)
        return cls(5.0, 60.0, 60.0, 15.0, 2000, 200, 0.1, 120.0, 500, 500, 20.0, 3.0, 1000)


class Context:
    """Per-run state: a temp dir, the fake RAPL tree, the agent that benchmarks 1-3 share, and notes between them."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.durations = Durations.for_mode(quick)
        self._stack = contextlib.ExitStack()
        self.workdir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="wattmeter-bench-")))
        self.rapl = make_fake_rapl(self.workdir / "powercap")
        self._shared_agent: ManagedProcess | None = None
        self.notes: dict[str, Any] = {}

    def shared_agent(self) -> ManagedProcess:
        """One agent for overhead, latency and rss (started on first use, stopped at the end of the run)."""
        if self._shared_agent is None:
            self._shared_agent = self.start_agent("agent-shared")
            self.notes["shared_agent_started_mono"] = time.monotonic()
        self._shared_agent.check_alive()
        return self._shared_agent

    def start_agent(self, name: str) -> ManagedProcess:
        proc = start_agent(self.workdir, self.rapl, name)
        self._stack.callback(proc.stop)
        return proc

    def start_node_exporter(self, extra_args: Sequence[str] = ()) -> ManagedProcess:
        proc = start_node_exporter(self.workdir, self.rapl, extra_args)
        self._stack.callback(proc.stop)
        return proc

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def stopping(proc: ManagedProcess) -> Iterator[ManagedProcess]:
    """Stop ``proc`` when the block ends (it is also stopped at the end of the run if this is skipped)."""
    try:
        yield proc
    finally:
        proc.stop()


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        affinity = os.cpu_count() or 0
    info: dict[str, Any] = {
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "clk_tck": CLK_TCK,
    }
    with contextlib.suppress(BenchError):
        info["node_exporter"] = node_exporter_version(node_exporter_path())
    return info
