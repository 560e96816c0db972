"""The telemetry pipe end to end: real ``wattmeter aggregator`` and ``wattmeter agent`` processes (simulated GPUs),
gRPC over loopback, SQLite in tmp_path. The aggregator goes down for 30 s and comes back on the same database; an
agent is killed with batches on the wire and restarted on the same spool; a spool reaches its cap with the
aggregator down. Each time, what the agents produced is read back (the HTTP API, the SQLite store, the spools).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.config import StreamConfig
from collector.exporters.grpc_stream import open_spool
from collector.proto import wattmeter_pb2 as pb
from collector.spool import Spool
from collector.store.sqlite import SqliteStore
from tests.fakes.ports import free_port

REPO = Path(__file__).resolve().parents[2]
OUTAGE_S = 30.0  # issue 4: the aggregator is down this long while two agents stream
WAIT_S = 60.0  # every poll's deadline: generous, for a loaded 2-core VM
POLL_S = 0.1
STOP_WAIT_S = 15.0  # an agent or aggregator given SIGTERM exits well within this (their budget is 2 s)
SAMPLE_S = 0.1  # the 10 Hz
BATCH_S = 1.0  # [stream] batch_interval_s default
# A whole batch lost leaves a gap of at least BATCH_S between stored samples. The bound sits well under that and
# well over SAMPLE_S, so a stalled sampler thread on a busy machine (a late tick skips what it missed) is not taken
# for a loss; the sequence accounting below catches a lost batch of any length on its own.
MAX_GAP_S = 5 * SAMPLE_S
FAST_SAMPLE_S = 0.05  # the kill -9 and spool-cap tests: short intervals, quick runs
FAST_BATCH_S = 0.2
MIN_SPOOL_BYTES = 16 * 1024 * 1024  # the smallest [stream] spool_max_bytes the config takes
INSTANCE_LINE = re.compile(r"streaming to .*, instance ([0-9a-f-]{36})")
NS = 1_000_000_000
FOREVER_NS = 2**63 - 1

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# Processes


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Process:
    """``python -m collector ...`` with its output in a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path, http_url: str) -> None:
        self.name = name
        self.http_url = http_url
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "collector", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return http_get(self.http_url + "/healthz", timeout_s=2.0)[0] == 200
            except OSError:
                return False

        poll(healthy, f"{self.name} healthy", self)

    def terminate(self) -> None:
        """SIGTERM; it must exit cleanly."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(STOP_WAIT_S)
        assert code == 0, f"{self.name} exited with {code}:\n{self.log()}"

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(STOP_WAIT_S)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def parse_metrics(url: str) -> dict[str, float]:
    """``/metrics`` as ``name`` or ``name{label=value,...}`` (labels sorted) -> value."""
    status, body = http_get(url + "/metrics")
    assert status == 200, body
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def poll(condition: Callable[[], T | None], what: str, *logs_of: Process, timeout_s: float = WAIT_S) -> T:
    """Call ``condition`` until it returns something truthy; fail with the processes' logs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}:\n{p.log()[-6000:]}" for p in logs_of)
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for: {what}\n{logs}")
        time.sleep(POLL_S)


@dataclass
class AggregatorProcess:
    """``wattmeter aggregator`` on fixed loopback ports and one SQLite file, so it can be restarted on both."""

    workdir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    starts: int = 0
    current: Process | None = None

    @property
    def db(self) -> Path:
        return self.workdir / "aggregator.db"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Process:
        config = self.workdir / "aggregator.toml"
        config.write_text(
            f'[grpc]\nlisten = "{self.target}"\n\n'
            f'[http]\nlisten = "127.0.0.1:{self.http_port}"\n\n'
            f'[storage]\nurl = "sqlite:///{self.db}"\n'
        )
        self.starts += 1
        name = f"aggregator-{self.starts}"
        self.current = Process(name, ["aggregator", "--config", str(config)], self.workdir / f"{name}.log", self.url)
        self.current.wait_healthy()
        return self.current

    def samples(self, host: str, device: str) -> list[tuple[int, float]]:
        """Stored raw samples of a device through ``/api/v1/samples``: (t_ns, energy_j), in the order served."""
        status, body = http_get(f"{self.url}/api/v1/samples?host={host}&device={device}&since=0&until={FOREVER_NS}")
        assert status == 200, body
        return [(int(t), float(e)) for t, e, _ in json.loads(body)["samples"]]

    def metric(self, name: str) -> float:
        return parse_metrics(self.url)[name]

    def batches(self) -> dict[str, float]:
        """wattmeter_aggregator_batches_total by result, since this aggregator process started."""
        return {
            result: value
            for result in ("stored", "duplicate", "rejected", "error")
            for key, value in parse_metrics(self.url).items()
            if key == f"wattmeter_aggregator_batches_total{{result={result}}}"
        }

    def acked_sequence(self, instance_id: str) -> int:
        """The store's contiguous watermark for an agent instance, read from the SQLite file (WAL: beside the
        aggregator's writer)."""
        store = SqliteStore(self.db)
        try:
            return store.acked_sequence(instance_id)
        finally:
            store.close()


@dataclass
class AgentProcess:
    """``wattmeter agent`` with simulated GPUs streaming to ``target``; restartable on the same spool."""

    workdir: Path
    hostname: str
    target: str
    gpus: int = 2
    sample_s: float = SAMPLE_S
    batch_s: float = BATCH_S
    spool_max_bytes: int = 1024**3
    port: int = field(default_factory=free_port)
    starts: int = 0
    current: Process | None = None
    started_ns: int = 0  # when the current process was launched (wall clock, as sample times)

    @property
    def spool_dir(self) -> Path:
        return self.workdir / f"spool-{self.hostname}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            target=self.target,
            batch_interval_s=self.batch_s,
            spool_dir=self.spool_dir,
            spool_max_bytes=self.spool_max_bytes,
            reconnect_min_s=0.2,
            reconnect_max_s=2.0,  # the default 30 s would make the catch-up after the outage wait that long
            hostname=self.hostname,
        )

    def start(self) -> Process:
        stream = self.stream_config()
        config = self.workdir / f"agent-{self.hostname}.toml"
        config.write_text(
            f'[prometheus]\nlisten = "127.0.0.1:{self.port}"\n\n'
            "[sources.nvml]\nenabled = false\n\n"
            "[sources.rapl]\nenabled = false\n\n"
            "[sources.cpu_model]\nenabled = false\n\n"
            f"[sources.simulated]\ngpus = {self.gpus}\ninterval_s = {self.sample_s}\n\n"
            f'[api]\nsocket = "{self.workdir / f"agent-{self.hostname}.sock"}"\n\n'
            f'[stream]\ntarget = "{stream.target}"\nbatch_interval_s = {stream.batch_interval_s}\n'
            f'spool_dir = "{stream.spool_dir}"\nspool_max_bytes = {stream.spool_max_bytes}\n'
            f"reconnect_min_s = {stream.reconnect_min_s}\nreconnect_max_s = {stream.reconnect_max_s}\n"
            f'hostname = "{stream.hostname}"\n'
        )
        self.starts += 1
        self.started_ns = time.time_ns()
        name = f"agent-{self.hostname}-{self.starts}"
        self.current = Process(name, ["agent", "--config", str(config)], self.workdir / f"{name}.log", self.url)
        self.current.wait_healthy()
        return self.current

    @property
    def process(self) -> Process:
        assert self.current is not None
        return self.current

    def instance_id(self) -> str:
        """The running instance's id, from its start-up log line."""
        found = poll(
            lambda: INSTANCE_LINE.search(self.process.log()), f"{self.process.name}'s instance id", self.process
        )
        return found.group(1)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.url)

    def gpu_energy(self) -> dict[str, float]:
        """device id -> the GPU energy counter on /metrics (the counter the batches carry)."""
        energy = {}
        for key, value in self.metrics().items():
            match = re.fullmatch(r"wattmeter_gpu_energy_joules_total\{gpu=(\d+),.*\}", key)
            if match:
                energy[f"gpu{match.group(1)}"] = value
        return energy

    def devices(self) -> list[str]:
        return [f"gpu{n}" for n in range(self.gpus)]


@pytest.fixture
def cleanup() -> Iterator[list[Process]]:
    """Processes registered here are killed after the test, whatever happened (SIGCONT first: one may be paused)."""
    started: list[Process] = []
    yield started
    for process in started:
        if process.alive():
            process.resume()
            process.kill()


# --------------------------------------------------------------------------------------------------------------
# The spool, read as the agent would at its next start


@dataclass(frozen=True)
class Spooled:
    record_no: int
    batch: pb.Batch


def read_spool(directory: Path) -> tuple[list[Spooled], int]:
    """The pending records of a stopped agent's spool as batches, and the next record number (so every record
    ever appended is below it)."""
    with Spool(directory, fsync="never") as spool:
        first = spool.first_pending
        pending = [] if first is None else list(spool.read_from(first))
        return [Spooled(no, pb.Batch.FromString(payload)) for no, payload in pending], spool.next_record_no


def series_of(batches: Iterable[pb.Batch], device: str) -> list[tuple[int, float]]:
    return [
        (int(t), float(e))
        for batch in batches
        for series in batch.devices
        if series.device_id == device
        for t, e in zip(series.time_ns, series.energy_j, strict=True)
    ]


def largest_gap(times: list[int]) -> tuple[float, int]:
    """(seconds, index) of the largest step between consecutive times."""
    gaps = [(b - a, i) for i, (a, b) in enumerate(itertools.pairwise(times))]
    gap, index = max(gaps)
    return gap / NS, index


def assert_no_duplicates(times: list[int], what: str) -> None:
    assert times == sorted(times), f"{what}: samples out of time order"
    repeated = len(times) - len(set(times))
    assert repeated == 0, f"{what}: {repeated} timestamps stored more than once"


def scrape_value(agent: AgentProcess, name: str) -> float:
    return agent.metrics().get(name, 0.0)


def acked_at_least(agent: AgentProcess, batches: int) -> bool:
    return scrape_value(agent, "wattmeter_stream_acked_batches_total") >= batches


def stored_after(aggregator: AggregatorProcess, host: str, device: str, t_ns: int) -> bool:
    return any(t > t_ns for t, _ in aggregator.samples(host, device))


# --------------------------------------------------------------------------------------------------------------
# a) The aggregator down for 30 s while two agents stream


def test_aggregator_outage_every_sample_arrives_once(tmp_path: Path, cleanup: list[Process]) -> None:
    aggregator = AggregatorProcess(tmp_path)
    first = aggregator.start()
    cleanup.append(first)
    agents = [
        AgentProcess(tmp_path, "host-a", aggregator.target, gpus=2),
        AgentProcess(tmp_path, "host-b", aggregator.target, gpus=3),
    ]
    for agent in agents:
        cleanup.append(agent.start())
    instances = {agent.hostname: agent.instance_id() for agent in agents}
    for agent in agents:
        poll(partial(acked_at_least, agent, 3), f"{agent.hostname} streaming", agent.process, first)
    assert aggregator.metric("wattmeter_aggregator_agents_connected") == 2
    assert aggregator.batches()["rejected"] == 0

    first.kill()  # SIGKILL: no goodbye to the agents, nothing flushed
    killed_ns = time.time_ns()
    time.sleep(OUTAGE_S)  # the outage itself
    for agent in agents:
        assert agent.process.alive(), agent.process.log()
        during = agent.metrics()
        assert during["wattmeter_stream_connected"] == 0
        assert during["wattmeter_stream_spool_bytes"] > 0  # the outage's batches wait on disk
        assert during["wattmeter_stream_lag_seconds"] > OUTAGE_S / 2
    restarted = aggregator.start()  # same ports, same database
    cleanup.append(restarted)
    restarted_ns = time.time_ns()

    # Batches go oldest first on one stream, one after the other: once a sample from after the restart is stored,
    # the outage's backlog before it has been handled.
    for agent in agents:
        for device in agent.devices():
            poll(
                partial(stored_after, aggregator, agent.hostname, device, restarted_ns),
                f"{agent.hostname}/{device}: the backlog delivered",
                agent.process,
                restarted,
            )
    final_energy: dict[str, dict[str, float]] = {}
    for agent in agents:
        final_energy[agent.hostname] = agent.gpu_energy()  # just before the stop: all of this must be delivered
        agent.process.terminate()

    for agent in agents:
        instance = instances[agent.hostname]
        leftover, next_record_no = read_spool(agent.spool_dir)
        assert {s.batch.agent_instance_id for s in leftover} <= {instance}
        left_sequences = {s.batch.sequence for s in leftover}
        acked = aggregator.acked_sequence(instance)
        last_sequence = next_record_no - 1  # a fresh spool: record n holds batch n of this one instance
        # every batch the agent made is stored (up to the store's watermark) or still waits in its spool
        assert set(range(1, acked + 1)) | left_sequences == set(range(1, last_sequence + 1)), (
            f"{agent.hostname}: stored through {acked}, spooled {sorted(left_sequences)}, made {last_sequence}"
        )
        for device in agent.devices():
            what = f"{agent.hostname}/{device}"
            stored = aggregator.samples(agent.hostname, device)
            times = [t for t, _ in stored]
            assert_no_duplicates(times, what)
            spooled = series_of((s.batch for s in leftover), device)
            # a batch stored whose ack the agent did not get before it stopped is in both: with the same samples
            stored_at = dict(stored)
            assert all(stored_at.get(t, e) == e for t, e in spooled), f"{what}: spooled and stored samples differ"
            merged = sorted({**stored_at, **dict(spooled)}.items())
            merged_times = [t for t, _ in merged]
            # from the agent's first sample, through the outage, to its stop: no stretch without samples
            assert agent.started_ns < merged_times[0] < killed_ns
            assert merged_times[-1] > restarted_ns
            gap_s, at = largest_gap(merged_times)
            assert gap_s <= MAX_GAP_S, f"{what}: {gap_s:.3f} s without samples after t={merged_times[at]}"
            assert merged[-1][1] >= final_energy[agent.hostname][device], (
                f"{what}: the last energy delivered or spooled ({merged[-1][1]}) is below what /metrics showed "
                f"before the stop ({final_energy[agent.hostname][device]})"
            )
    batches = aggregator.batches()
    assert batches["rejected"] == batches["error"] == 0, batches
    restarted.terminate()


# --------------------------------------------------------------------------------------------------------------
# b) An agent killed with batches on the wire and in its spool, restarted on the same spool


def test_agent_killed_mid_stream_replays_its_spool_once(tmp_path: Path, cleanup: list[Process]) -> None:
    aggregator = AggregatorProcess(tmp_path)
    server = aggregator.start()
    cleanup.append(server)
    agent = AgentProcess(tmp_path, "host-k", aggregator.target, gpus=2, sample_s=FAST_SAMPLE_S, batch_s=FAST_BATCH_S)
    cleanup.append(agent.start())
    old_instance = agent.instance_id()
    poll(partial(acked_at_least, agent, 3), "the agent streaming", agent.process, server)

    # Freeze the aggregator: batches keep going out on the open stream and none is answered. Then freeze the agent
    # and let the aggregator go on: it stores those batches and acknowledges them into the frozen agent's socket.
    # kill -9 the agent there: its spool still holds batches the store has (a replay must not store them again)
    # and the ones made since.
    server.pause()
    try:

        def unanswered() -> float | None:
            metrics = agent.metrics()
            sent = metrics["wattmeter_stream_sent_batches_total"]
            return sent if sent - metrics["wattmeter_stream_acked_batches_total"] >= 5 else None

        sent = int(poll(unanswered, "batches sent and not acknowledged", agent.process))
        agent.process.pause()
    finally:
        server.resume()
    try:
        poll(
            lambda: aggregator.acked_sequence(old_instance) >= sent,
            f"the {sent} batches sent stored",
            agent.process,
            server,
        )
    finally:
        agent.process.kill()  # SIGKILL ends a stopped process too
    stored_before = aggregator.acked_sequence(old_instance)

    pending, _ = read_spool(agent.spool_dir)
    pairs = [(s.batch.agent_instance_id, s.batch.sequence) for s in pending]
    assert {instance for instance, _ in pairs} == {old_instance}
    sequences = [sequence for _, sequence in pairs]
    assert sequences == list(range(sequences[0], sequences[-1] + 1)), sequences
    already = [sequence for sequence in sequences if sequence <= stored_before]
    assert len(already) >= 5, (pairs, stored_before)  # stored, and still in the spool: a replay sends them again
    duplicates_before = aggregator.batches()["duplicate"]

    restarted = agent.start()  # the same spool_dir
    cleanup.append(restarted)
    new_instance = agent.instance_id()
    assert new_instance != old_instance
    poll(
        lambda: aggregator.acked_sequence(old_instance) >= sequences[-1],
        f"the spooled batches {sequences[0]}..{sequences[-1]} of the killed instance stored",
        restarted,
        server,
    )
    poll(lambda: aggregator.acked_sequence(new_instance) >= 3, "the new instance streaming", restarted, server)
    restarted.terminate()

    # the killed instance made nothing after its last spooled batch: the watermark stops exactly there
    assert aggregator.acked_sequence(old_instance) == sequences[-1]
    for device in agent.devices():
        what = f"{agent.hostname}/{device}"
        times = [t for t, _ in aggregator.samples(agent.hostname, device)]
        assert_no_duplicates(times, what)
        replayed = [t for t, _ in series_of((s.batch for s in pending), device)]
        assert replayed
        missing = set(replayed) - set(times)
        assert not missing, f"{what}: {len(missing)} of the {len(replayed)} spooled samples not stored"
        old_end = replayed[-1]
        old = [t for t in times if t <= old_end]
        gap_s, at = largest_gap(old)
        assert gap_s <= MAX_GAP_S, f"{what}: {gap_s:.3f} s without samples after t={old[at]} (killed instance)"
        assert any(t > agent.started_ns for t in times), f"{what}: nothing from the restarted agent"
    batches = aggregator.batches()
    assert batches["rejected"] == batches["error"] == 0, batches
    assert batches["duplicate"] - duplicates_before >= len(already), batches  # the replay came, and was refused
    server.terminate()


# --------------------------------------------------------------------------------------------------------------
# c) The spool at its cap with the aggregator down


PREFILL_MARGIN = 8 * 1024  # room the agent itself fills within a few batches, past which the oldest segment goes


def earlier_batch(sequence: int, start_ns: int) -> pb.Batch:
    """A batch an earlier run of the agent left in its spool: 8 GPUs x 80 samples (about 16 KiB)."""
    times = [start_ns + sequence * 8 * NS + k * SAMPLE_S * NS for k in range(80)]
    return pb.Batch(
        protocol_major=1,
        host=pb.HostIdentity(hostname="host-c"),
        agent_instance_id="an-earlier-run",
        sequence=sequence,
        created_ns=int(times[-1]),
        oldest_pending_sequence=1,
        devices=[
            pb.DeviceSeries(
                device_id=f"gpu{gpu}",
                kind="gpu",
                source="simulated",
                time_ns=[int(t) for t in times],
                energy_j=[100.0 * (sequence * 80 + k) for k in range(80)],
                power_w=[1000.0] * 80,
                in_host_total=True,
            )
            for gpu in range(8)
        ],
    )


def test_spool_at_its_cap_drops_the_oldest_and_the_agent_stays_up(tmp_path: Path, cleanup: list[Process]) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # no aggregator there
    agent = AgentProcess(
        tmp_path,
        "host-c",
        nobody,
        gpus=4,
        sample_s=FAST_SAMPLE_S,
        batch_s=FAST_BATCH_S,
        spool_max_bytes=MIN_SPOOL_BYTES,
    )
    # An earlier run's backlog (the aggregator has been unreachable for a while): the spool all but full. Opened as
    # the agent opens it, so its segments are the size the agent's will be.
    start_ns = time.time_ns() - 3600 * NS
    with open_spool(agent.stream_config()) as spool:
        segment_bytes = spool.segment_bytes
        record = len(earlier_batch(1, start_ns).SerializeToString()) + 64
        sequence = 0
        while spool.bytes + record <= MIN_SPOOL_BYTES - PREFILL_MARGIN:
            sequence += 1
            spool.append(earlier_batch(sequence, start_ns).SerializeToString())
        assert spool.dropped_records == 0
    prefilled = sequence

    cleanup.append(agent.start())
    instance = agent.instance_id()
    poll(
        lambda: scrape_value(agent, "wattmeter_stream_dropped_batches_total") > 0,
        "batches dropped for the cap",
        agent.process,
    )
    dropped_seen = scrape_value(agent, "wattmeter_stream_dropped_batches_total")
    sampled = agent.gpu_energy()["gpu0"]
    # still sampling and serving after the drop: its counters move on
    poll(lambda: agent.gpu_energy()["gpu0"] > sampled, "the agent still sampling", agent.process)
    metrics = agent.metrics()
    assert http_get(agent.url + "/healthz")[0] == 200
    assert metrics["wattmeter_stream_connected"] == 0
    assert metrics["wattmeter_stream_acked_batches_total"] == 0
    assert metrics["wattmeter_stream_spool_bytes"] <= MIN_SPOOL_BYTES + segment_bytes
    on_disk = sum(path.stat().st_size for path in agent.spool_dir.glob("*.seg"))
    assert on_disk <= MIN_SPOOL_BYTES + segment_bytes, on_disk
    assert "is full" in agent.process.log()  # said once, not per batch
    agent.process.terminate()

    pending, next_record_no = read_spool(agent.spool_dir)
    numbers = [s.record_no for s in pending]
    assert numbers == list(range(numbers[0], next_record_no))  # what is left is one run, up to the newest
    dropped = numbers[0] - 1  # nothing was acknowledged: every record before the first left was dropped
    assert dropped_seen <= dropped < prefilled  # the oldest went, only as many as the cap needed
    earlier = [s.batch.sequence for s in pending if s.batch.agent_instance_id == "an-earlier-run"]
    assert earlier == list(range(dropped + 1, prefilled + 1))
    own = [s.batch.sequence for s in pending if s.batch.agent_instance_id == instance]
    assert own == list(range(1, len(own) + 1)), own  # the agent's own batches are all still there
