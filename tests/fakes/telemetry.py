"""The stream tests' world: ``RecordingTelemetry``, a small ``wattmeter.v1.Telemetry`` servicer that stores batches
deduplicated by (instance, sequence) and acks the highest contiguous sequence like the aggregator (it can refuse
streams, reject or choke on chosen batches, and stall), served on loopback; a static sampler to feed an exporter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from collector.config import StreamConfig
from collector.exporters.grpc_stream import StreamExporter
from collector.proto import wattmeter_pb2 as pb
from collector.proto import wattmeter_pb2_grpc as pb_grpc
from collector.readings import DeviceInfo, DeviceKind, DeviceReading
from collector.sampler import Sampler
from collector.sources.base import Source

MACHINE_ID = "0123456789abcdef0123456789abcdef"

BOOT_ID = "5e1f0a2b-1c3d-4e5f-8a9b-0c1d2e3f4a5b"

WAIT_S = 20.0  # generous: a loaded 2-core VM


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class RecordingTelemetry(pb_grpc.TelemetryServicer):
    stored: list[pb.Batch] = field(default_factory=list)
    received: list[tuple[str, int]] = field(default_factory=list)  # every (instance, sequence) read, duplicates too
    metadata: list[dict[str, str]] = field(default_factory=list)
    peers: list[list[bytes]] = field(default_factory=list)  # client cert CNs per stream
    refuse: tuple[grpc.StatusCode, str] | None = None
    required_token: str | None = None
    reject: set[int] = field(default_factory=set)  # sequences answered with rejected_sequence
    choke_on: set[int] = field(default_factory=set)  # sequences that make the server abort the stream
    stall_streams: int = 0  # the first N streams are read but never acked
    streams: int = 0
    _contiguous: dict[str, int] = field(default_factory=dict)
    _done: dict[str, set[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Stream(self, request_iterator: Iterator[pb.Batch], context: grpc.ServicerContext) -> Iterator[pb.Ack]:
        with self.lock:
            self.streams += 1
            stalled = self.streams <= self.stall_streams
            self.metadata.append({key: str(value) for key, value in context.invocation_metadata()})
            self.peers.append(list(context.auth_context().get("x509_common_name", [])))
        if self.refuse is not None:
            context.abort(*self.refuse)
        token = dict(self.metadata[-1]).get("authorization")
        if self.required_token is not None and token != f"Bearer {self.required_token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        for batch in request_iterator:
            key = (batch.agent_instance_id, batch.sequence)
            with self.lock:
                self.received.append(key)
            if stalled:
                continue
            if batch.sequence in self.choke_on:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {batch.sequence} is garbage")
            yield self._store(batch)

    def _store(self, batch: pb.Batch) -> pb.Ack:
        instance, sequence = batch.agent_instance_id, batch.sequence
        with self.lock:
            done = self._done.setdefault(instance, set())
            rejected = sequence in self.reject
            if sequence not in done:
                done.add(sequence)
                if not rejected:
                    self.stored.append(batch)
            contiguous = max(self._contiguous.get(instance, 0), batch.oldest_pending_sequence - 1)
            while contiguous + 1 in done:
                contiguous += 1
            self._contiguous[instance] = contiguous
        ack = pb.Ack(agent_instance_id=instance, acked_sequence=contiguous)
        if rejected:
            ack.rejected_sequence = sequence
            ack.error = "energy_j is negative"
        return ack

    def sequences(self, instance: str) -> list[int]:
        with self.lock:
            return [b.sequence for b in self.stored if b.agent_instance_id == instance]


class LoopbackServer:
    def __init__(self, servicer: RecordingTelemetry, port: int = 0, credentials: grpc.ServerCredentials | None = None):
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_TelemetryServicer_to_server(servicer, self.server)
        address = f"127.0.0.1:{port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)


class StaticSource(Source):
    """Devices with fixed descriptions; readings are handed to the exporter's listeners by the test."""

    name = "static"

    def __init__(self, infos: Sequence[DeviceInfo]) -> None:
        self.infos = list(infos)

    def devices(self) -> Sequence[DeviceInfo]:
        return self.infos

    def read(self) -> Sequence[DeviceReading]:
        return []


DEVICES = (
    DeviceInfo("gpu0", DeviceKind.GPU, "nvml", "NVIDIA", "H100", 0),
    DeviceInfo("cpu0", DeviceKind.CPU, "rapl", "Intel", "Xeon", 0, package="0", domain="package"),
    DeviceInfo("cpu0-core", DeviceKind.CPU, "rapl", "Intel", "Xeon", 0, package="0", domain="core"),
    DeviceInfo("dram0", DeviceKind.DRAM, "rapl", "Intel", "Xeon", 0, package="0", domain="dram"),
)


def static_sampler() -> Sampler:
    sampler = Sampler([StaticSource(DEVICES)])
    sampler.mark_opened(sampler.states[0])
    return sampler


def stream_config(tmp_path: Path, target: str, **overrides: Any) -> StreamConfig:
    values: dict[str, Any] = {
        "target": target,
        "spool_dir": str(tmp_path / "spool"),
        "batch_interval_s": 60.0,  # the tests flush by hand
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        "fsync": "never",
        "hostname": "host-a",
    }
    values.update(overrides)
    return StreamConfig.model_validate(values)


def reading(device_id: str, energy_j: float, power_w: float | None, t_s: float) -> DeviceReading:
    return DeviceReading(device_id, energy_j, power_w, int(t_s * 1e9), int(1.7e18 + t_s * 1e9))


def feed(exporter: StreamExporter, t_s: float, energy_j: float, power_w: float | None = 100.0) -> None:
    exporter.builder.on_readings("static", [reading(info.device_id, energy_j, power_w, t_s) for info in DEVICES])


def samples(body: bytes) -> dict[str, float]:
    """Unlabelled samples of an exposition by name."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if not sample.labels
    }


def spool_empty(exporter: StreamExporter) -> bool:
    return exporter.spool.first_pending is None
