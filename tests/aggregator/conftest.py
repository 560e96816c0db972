"""A real aggregator (gRPC over loopback, SQLite in tmp_path) on a background event loop, and batches to send it."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from collector.aggregator.config import AggregatorConfig
from collector.aggregator.service import Aggregator
from collector.proto import wattmeter_pb2 as pb

# fixtures: a fresh PostgreSQL schema; a migrated store on each backend in turn
from tests.fakes.databases import postgres_url, store, store_url  # noqa: F401

WAIT_S = 30.0  # generous: a loaded 2-core VM
STREAM = "/wattmeter.v1.Telemetry/Stream"


class RunningAggregator:
    """``Aggregator`` started on its own event loop thread, as ``wattmeter aggregator`` runs it."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-aggregator", daemon=True)
        self.thread.start()
        self.aggregator = Aggregator(config)
        try:
            self._call(self.aggregator.start())
        except BaseException:
            self.aggregator.close()
            self._stop_loop()
            raise
        self.stopped = False

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT_S)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.aggregator.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.aggregator.http_port}"

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._call(self.aggregator.stop())
            self._stop_loop()


def base_config(tmp_path: Path, **sections: dict[str, Any]) -> AggregatorConfig:
    data: dict[str, Any] = {
        "grpc": {"listen": "127.0.0.1:0"},
        "http": {"listen": "127.0.0.1:0"},
        "storage": {"url": f"sqlite:///{tmp_path / 'aggregator.db'}"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return AggregatorConfig.model_validate(data)


AggregatorFactory = Callable[..., RunningAggregator]


@pytest.fixture
def start_aggregator(tmp_path: Path) -> Iterator[AggregatorFactory]:
    """Start an aggregator on ``tmp_path``'s database; sections override the config. Stopped after the test."""
    started: list[RunningAggregator] = []

    def start(**sections: dict[str, Any]) -> RunningAggregator:
        running = RunningAggregator(base_config(tmp_path, **sections))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def aggregator(start_aggregator: AggregatorFactory) -> RunningAggregator:
    return start_aggregator()


# -- batches


def now_ns() -> int:
    return time.time_ns()


def device(
    device_id: str = "gpu0",
    times: Sequence[int] = (),
    energy: Sequence[float] = (),
    power: Sequence[float] = (),
    kind: str = "gpu",
    in_host_total: bool = True,
    source: str = "simulated",
) -> pb.DeviceSeries:
    return pb.DeviceSeries(
        device_id=device_id,
        kind=kind,
        source=source,
        time_ns=list(times),
        energy_j=list(energy),
        power_w=list(power),
        in_host_total=in_host_total,
    )


def workload(
    name: str,
    phase: str,
    device_id: str = "gpu0",
    times: Sequence[int] = (),
    energy: Sequence[float] = (),
    job: str = "",
) -> pb.WorkloadSeries:
    return pb.WorkloadSeries(
        workload=pb.WorkloadIdentity(workload=name, phase=phase, job=job),
        device_id=device_id,
        time_ns=list(times),
        energy_j=list(energy),
    )


def batch(
    sequence: int,
    devices: Sequence[pb.DeviceSeries] = (),
    workloads: Sequence[pb.WorkloadSeries] = (),
    instance: str = "instance-1",
    host: str = "host-a",
    protocol_major: int = 1,
    oldest_pending: int = 0,
) -> pb.Batch:
    return pb.Batch(
        protocol_major=protocol_major,
        host=pb.HostIdentity(hostname=host, machine_id="m-" + host, boot_id="b-1"),
        agent_instance_id=instance,
        sequence=sequence,
        created_ns=now_ns(),
        oldest_pending_sequence=oldest_pending,
        devices=list(devices),
        workloads=list(workloads),
    )


def simple_batch(
    sequence: int, start_ns: int, energy0: float = 1000.0, instance: str = "instance-1", host: str = "host-a"
) -> pb.Batch:
    """gpu0 at 100 W for 1 s (10 samples), workload train/training taking 60 W of it and idle the rest.

    The workloads' counters go on from ``energy0`` (1000 J: they start at 0), so that a batch that starts at the
    last batch's final energy continues all three series."""
    times = [start_ns + i * 100_000_000 for i in range(10)]
    steps = (energy0 - 1000.0) / 10.0
    return batch(
        sequence,
        [device("gpu0", times, [energy0 + 10.0 * i for i in range(10)], [100.0] * 10)],
        [
            workload("train", "training", "gpu0", times, [6.0 * (steps + i) for i in range(10)]),
            workload("idle", "", "gpu0", times, [4.0 * (steps + i) for i in range(10)]),
        ],
        instance=instance,
        host=host,
    )


# -- the stream


@dataclass
class StreamResult:
    acks: list[pb.Ack]
    code: grpc.StatusCode | None  # None: the stream ended OK
    details: str


def send(
    channel: grpc.Channel, payloads: Sequence[bytes | pb.Batch], metadata: Sequence[tuple[str, str]] | None = None
) -> StreamResult:
    """Send ``payloads`` on one stream (raw bytes as they are) and collect the acks until the stream ends."""
    call = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=pb.Ack.FromString)
    raw = [p if isinstance(p, bytes) else p.SerializeToString() for p in payloads]
    acks: list[pb.Ack] = []
    try:
        for ack in call(iter(raw), timeout=WAIT_S, metadata=metadata):
            acks.append(ack)
    except grpc.RpcError as exc:
        return StreamResult(acks, exc.code(), exc.details() or "")
    return StreamResult(acks, None, "")


@pytest.fixture
def channel(aggregator: RunningAggregator) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(aggregator.target) as opened:
        yield opened


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
