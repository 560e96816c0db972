"""The stream exporter against a real gRPC server on loopback, with a real spool on disk.

``RecordingTelemetry`` is a small ``wattmeter.v1.Telemetry`` servicer that stores batches deduplicated by (instance,
sequence) and acks the highest contiguous sequence like the aggregator; it can refuse streams, reject or choke on
chosen batches, and stall (read without acking).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from collector.agent import SHUTDOWN_BUDGET_S, Agent
from collector.attribution import IDLE, SYSTEM
from collector.config import StreamConfig, WorkloadsConfig, load_config
from collector.errors import ConfigError
from collector.exporters.batching import BatchBuilder
from collector.exporters.grpc_stream import StreamExporter, stream_families
from collector.exporters.prometheus import ExpositionCache
from collector.exporters.stream_channel import backoff_s
from collector.proto import wattmeter_pb2 as pb
from collector.readings import DeviceInfo, DeviceKind
from collector.sampler import Sampler
from collector.sources.simulated import SIM_PID_BASE, SimulatedSource
from collector.spool import Spool
from collector.workloads.tracker import WorkloadTracker
from tests.fakes.certs import Pki, make_pki
from tests.fakes.ports import free_port
from tests.fakes.telemetry import (
    BOOT_ID,
    DEVICES,
    MACHINE_ID,
    LoopbackServer,
    RecordingTelemetry,
    StaticSource,
    feed,
    reading,
    samples,
    spool_empty,
    static_sampler,
    stream_config,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]


# --- the test aggregator -------------------------------------------------------------------------------------------


# --- the agent's side ------------------------------------------------------------------------------------------------


@pytest.fixture
def make_exporter(host_root: Path) -> Iterator[Callable[..., StreamExporter]]:
    made: list[StreamExporter] = []

    def make(
        config: StreamConfig, sampler: Sampler | None = None, tracker: WorkloadTracker | None = None
    ) -> StreamExporter:
        exporter = StreamExporter(config, sampler or static_sampler(), tracker, host_root=host_root)
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.stop()


# --- batches -------------------------------------------------------------------------------------------------------


def test_batches_arrive_in_order_with_their_series_and_acks_release_the_spool(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    exporter = make_exporter(stream_config(tmp_path, server.target))
    for batch_index in range(3):
        feed(exporter, batch_index * 2 + 0.1, 10.0 * batch_index, 100.0)
        feed(exporter, batch_index * 2 + 0.2, 10.0 * batch_index + 5, None)
        assert exporter.flush() == 1
    assert exporter.spool.first_pending is not None  # spooled before anything is sent
    exporter.start()
    wait_until(lambda: len(servicer.stored) == 3 and spool_empty(exporter), "3 batches stored and acked")

    batches = servicer.stored
    assert [b.sequence for b in batches] == [1, 2, 3]
    assert {b.agent_instance_id for b in batches} == {exporter.instance_id}
    first = batches[0]
    assert first.protocol_major == 1
    assert (first.host.hostname, first.host.machine_id, first.host.boot_id) == ("host-a", MACHINE_ID, BOOT_ID)
    assert first.oldest_pending_sequence == 1
    assert [b.oldest_pending_sequence for b in batches] == [1, 1, 1]  # none was acked when they were made
    assert first.created_ns <= batches[1].created_ns <= batches[2].created_ns
    series = {s.device_id: s for s in batches[2].devices}
    assert set(series) == {"gpu0", "cpu0", "cpu0-core", "dram0"}
    gpu = series["gpu0"]
    assert (gpu.kind, gpu.source, gpu.in_host_total) == ("gpu", "nvml", True)
    assert list(gpu.time_ns) == [int(1.7e18 + 4.1e9), int(1.7e18 + 4.2e9)]
    assert list(gpu.energy_j) == [20.0, 25.0]
    assert gpu.power_w[0] == 100.0 and math.isnan(gpu.power_w[1])
    assert [(series[d].kind, series[d].in_host_total) for d in ("cpu0", "cpu0-core", "dram0")] == [
        ("cpu", True),
        ("cpu", False),  # a part of the package: not added into host totals
        ("dram", True),
    ]
    stats = exporter.stats()
    assert (stats.sent_batches, stats.acked_batches, stats.dropped_batches, stats.rejected_batches) == (3, 3, 0, 0)
    assert stats.lag_s == 0.0


def test_a_device_without_power_sends_no_power_column(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    exporter = make_exporter(stream_config(tmp_path, server.target))
    feed(exporter, 1.0, 1.0, None)
    feed(exporter, 2.0, 2.0, None)
    exporter.flush()
    assert exporter.flush() == 0  # an empty interval sends nothing
    exporter.start()
    wait_until(lambda: len(servicer.stored) == 1, "the batch")
    assert all(len(s.power_w) == 0 and len(s.energy_j) == 2 for s in servicer.stored[0].devices)


def test_workload_series_are_pinned_at_both_ends_of_a_flat_stretch(tmp_path: Path) -> None:
    builder = BatchBuilder(static_sampler(), 4 * 1024 * 1024)
    train = ("llama", "training", "job-7")
    splits: list[dict[Any, float]] = [
        {train: 1.0, IDLE: 0.5},  # t1
        {train: 1.0},  # t2: idle flat from here
        {},  # t3: train flat from here
        {},  # t4
        {train: 2.0, SYSTEM: 0.25},  # t5: a change after the flat stretch; a new key
    ]
    for index, split in enumerate(splits, start=1):
        builder.on_split(reading("gpu0", 0.0, None, index), split, True)
    (buffer,) = builder.take()
    _, workloads = buffer.to_proto()
    got = {
        (w.workload.workload, w.workload.phase, w.workload.job): [
            (round((t - 1.7e18) / 1e9), e) for t, e in zip(w.time_ns, w.energy_j, strict=True)
        ]
        for w in workloads
    }
    assert got == {
        train: [(1, 1.0), (2, 2.0), (3, 2.0), (4, 2.0), (5, 4.0)],
        ("idle", "", ""): [(1, 0.5), (2, 0.5)],
        ("system", "", ""): [(4, 0.0), (5, 0.25)],  # a new series starts from 0 at the reading before
    }
    builder.on_split(reading("gpu0", 0.0, None, 6), {}, True)
    (buffer,) = builder.take()
    _, workloads = buffer.to_proto()
    assert {(w.workload.workload, tuple(w.energy_j)) for w in workloads} == {("llama", (4.0,)), ("system", (0.25,))}


def test_a_full_buffer_is_cut_into_batches_under_max_batch_bytes(tmp_path: Path) -> None:
    sampler = static_sampler()
    limit = 64 * 1024
    builder = BatchBuilder(sampler, limit)
    for i in range(10_000):
        builder.on_readings("static", [reading(info.device_id, float(i), 1.0, i * 0.1) for info in DEVICES])
    assert builder.cut.is_set()
    buffers = builder.take()
    assert len(buffers) > 5
    total = 0
    for buffer in buffers:
        devices, _ = buffer.to_proto()
        size = pb.Batch(devices=devices).ByteSize()
        assert size <= limit
        total += sum(len(s.time_ns) for s in devices)
    assert total == 10_000 * len(DEVICES)  # nothing lost at the cuts


def test_a_device_taken_over_by_another_source_never_steps_back(tmp_path: Path) -> None:
    model = StaticSource([DeviceInfo("cpu0", DeviceKind.CPU, "model", "", "", 0, package="0", domain="package")])
    model.name = "model"
    rapl = StaticSource([DEVICES[1]])
    rapl.name = "rapl"
    sampler = Sampler([model, rapl])
    for state in sampler.states:
        sampler.mark_opened(state)
    builder = BatchBuilder(sampler, 4 * 1024 * 1024)
    builder.on_readings("model", [reading("cpu0", 500.0, 50.0, 1)])
    builder.on_readings("rapl", [reading("cpu0", 20.0, 60.0, 2)])  # the hardware counter starts elsewhere
    builder.on_readings("rapl", [reading("cpu0", 26.0, 60.0, 3)])
    (buffer,) = builder.take()
    devices, _ = buffer.to_proto()
    assert list(devices[0].energy_j) == [500.0, 500.0, 506.0]


def test_process_bindings_are_sent_once_and_again_only_when_changed(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    simulated = SimulatedSource(2, interval_s=0.05, processes_per_gpu=2)
    sampler = Sampler([simulated])
    simulated.open()
    sampler.mark_opened(sampler.states[0])
    tracker = WorkloadTracker(WorkloadsConfig(interval_s=0.1), sampler)
    exporter = make_exporter(stream_config(tmp_path, server.target), sampler, tracker)
    exporter.bindings_interval_s = 0.0
    tracker.start()
    sampler.start()
    try:
        own_pid = os.getpid()  # pytest uses CPU, so a scan resolves it from /proc
        wait_until(lambda: own_pid in tracker.process_bindings(), "this process to be identified")
        wait_until(lambda: SIM_PID_BASE + 1 in tracker.process_bindings(), "the simulated processes")
        assert exporter.flush() == 1
        wait_until(lambda: exporter.flush() == 1, "a second batch of readings")
        exporter.start()
        wait_until(lambda: len(servicer.stored) == 2, "2 batches")
    finally:
        sampler.stop()
        tracker.stop()
    first, second = servicer.stored
    bound = {p.pid: (p.workload.workload, p.workload.phase, p.workload.job) for p in first.processes}
    assert bound[SIM_PID_BASE + 1] == ("sim-worker-0-1", "inference", "sim-job-0")
    assert own_pid in bound
    assert not {p.pid for p in second.processes} & {SIM_PID_BASE, SIM_PID_BASE + 1, own_pid}  # not repeated
    workloads = {(w.workload.workload, w.device_id) for b in servicer.stored for w in b.workloads}
    assert ("sim-worker-0-1", "gpu0") in workloads or ("idle", "gpu0") in workloads


# --- delivery --------------------------------------------------------------------------------------------------------


def test_aggregator_down_batches_spool_then_all_arrive_once_it_is_up(
    tmp_path: Path, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    port = free_port()
    exporter = make_exporter(stream_config(tmp_path, f"127.0.0.1:{port}"))
    exporter.start()
    for i in range(5):
        feed(exporter, i, float(i))
        exporter.flush()
    time.sleep(0.3)  # a few reconnect attempts against nothing
    stats = exporter.stats()
    assert not stats.connected and stats.acked_batches == 0
    assert stats.spool_bytes > 0 and stats.lag_s > 0
    assert len(list(exporter.spool.read_from(0))) == 5
    server = LoopbackServer(servicer, port)
    try:
        wait_until(lambda: spool_empty(exporter), "the spool to drain")
        assert servicer.sequences(exporter.instance_id) == [1, 2, 3, 4, 5]
        feed(exporter, 9, 9.0)
        exporter.flush()
        wait_until(lambda: len(servicer.stored) == 6, "a new batch on the open stream")
        wait_until(lambda: exporter.stats().connected, "connected")
    finally:
        server.stop()


def test_a_restarted_exporter_replays_the_spool_with_the_original_instance_and_sequence(
    tmp_path: Path, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    port = free_port()
    config = stream_config(tmp_path, f"127.0.0.1:{port}", fsync="always")
    first = make_exporter(config)
    first.start()
    for i in range(3):
        feed(first, i, float(i))
        first.flush()
    feed(first, 3, 3.0)  # gathered but not flushed: stop spools it
    first.stop()
    second = make_exporter(config)
    assert second.instance_id != first.instance_id
    feed(second, 10, 100.0)
    second.flush()
    server = LoopbackServer(servicer, port)
    try:
        second.start()
        wait_until(lambda: spool_empty(second), "the replay to be acked")
    finally:
        server.stop()
    assert [(b.agent_instance_id, b.sequence) for b in servicer.stored] == [
        (first.instance_id, 1),
        (first.instance_id, 2),
        (first.instance_id, 3),
        (first.instance_id, 4),
        (second.instance_id, 1),
    ]
    assert list(servicer.stored[3].devices[0].energy_j) == [3.0]


def test_replayed_batches_stuck_behind_a_gap_are_released_by_their_own_answers(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    # an earlier agent's batches 3..70 whose batch 1 and 2 the spool's cap dropped: their oldest_pending_sequence
    # (1, from when they were made) holds the aggregator's watermark at 0 for good, more than a window of them
    config = stream_config(tmp_path, server.target)
    with Spool(config.spool_dir) as spool:
        for sequence in range(3, 71):
            old = pb.Batch(
                protocol_major=1,
                host=pb.HostIdentity(hostname="host-a"),
                agent_instance_id="old-instance",
                sequence=sequence,
                created_ns=time.time_ns(),
                oldest_pending_sequence=1,
                devices=[pb.DeviceSeries(device_id="gpu0", kind="gpu", time_ns=[sequence], energy_j=[1.0 * sequence])],
            )
            spool.append(old.SerializeToString())
    exporter = make_exporter(config)
    feed(exporter, 100, 100.0)
    exporter.flush()
    exporter.start()
    wait_until(lambda: spool_empty(exporter), "the spool to drain")
    assert servicer.sequences("old-instance") == list(range(3, 71))
    assert servicer.sequences(exporter.instance_id) == [1]
    assert servicer._contiguous["old-instance"] == 0  # the watermark never covered them
    assert exporter.stats().acked_batches == 69


def test_a_rejected_batch_is_dropped_and_counted_and_the_stream_goes_on(
    tmp_path: Path,
    server: LoopbackServer,
    servicer: RecordingTelemetry,
    make_exporter: Callable[..., StreamExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer.reject = {2}
    exporter = make_exporter(stream_config(tmp_path, server.target))
    exporter.start()
    for i in range(3):
        feed(exporter, i, float(i))
        exporter.flush()
    wait_until(lambda: spool_empty(exporter) and exporter.stats().acked_batches == 2, "acks")
    assert servicer.sequences(exporter.instance_id) == [1, 3]
    stats = exporter.stats()
    assert (stats.acked_batches, stats.rejected_batches) == (2, 1)
    assert any("refused batch 2" in r.message and "energy_j is negative" in r.message for r in caplog.records)


def test_a_batch_that_keeps_breaking_the_stream_is_dropped_after_a_few_tries(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    servicer.choke_on = {2}
    exporter = make_exporter(stream_config(tmp_path, server.target))
    feed(exporter, 0, 0.0)
    exporter.flush()
    exporter.start()
    wait_until(lambda: spool_empty(exporter), "batch 1")
    for i in (1, 2):
        feed(exporter, i, float(i))
        exporter.flush()
    wait_until(lambda: servicer.sequences(exporter.instance_id) == [1, 3], "batch 3 past the bad one")
    assert servicer.received.count((exporter.instance_id, 2)) == 3
    assert exporter.stats().rejected_batches == 1


def test_an_unreadable_record_in_the_spool_is_skipped_and_counted(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    config = stream_config(tmp_path, server.target)
    with Spool(config.spool_dir) as spool:
        spool.append(b"\xff not a batch")
    exporter = make_exporter(config)
    feed(exporter, 0, 0.0)
    exporter.flush()
    exporter.start()
    wait_until(lambda: spool_empty(exporter), "the spool to drain")
    assert servicer.sequences(exporter.instance_id) == [1]
    assert exporter.stats().dropped_batches == 1


def test_a_disk_full_batch_is_dropped_counted_and_its_sequence_reused(
    tmp_path: Path,
    server: LoopbackServer,
    servicer: RecordingTelemetry,
    make_exporter: Callable[..., StreamExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from collector.spool import SpoolError

    exporter = make_exporter(stream_config(tmp_path, server.target))
    real_append = exporter.spool.append

    def full(payload: bytes) -> int:
        raise SpoolError("spool disk full: cannot write (No space left on device)")

    monkeypatch.setattr(exporter.spool, "append", full)
    feed(exporter, 0, 0.0)
    assert exporter.flush() == 0
    monkeypatch.setattr(exporter.spool, "append", real_append)
    feed(exporter, 1, 1.0)
    assert exporter.flush() == 1
    exporter.start()
    wait_until(lambda: spool_empty(exporter), "the next batch")
    assert servicer.sequences(exporter.instance_id) == [1]  # no gap for the aggregator to wait on
    assert exporter.stats().dropped_batches == 1


def test_no_ack_within_ack_timeout_reconnects_and_resends(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    servicer.stall_streams = 1
    exporter = make_exporter(stream_config(tmp_path, server.target, ack_timeout_s=0.3))
    feed(exporter, 0, 0.0)
    exporter.flush()
    exporter.start()
    wait_until(lambda: spool_empty(exporter), "the batch acked on a new stream")
    assert servicer.streams >= 2
    assert servicer.received.count((exporter.instance_id, 1)) >= 2  # sent on the stalled stream, then again
    assert servicer.sequences(exporter.instance_id) == [1]


def test_an_unauthenticated_stream_keeps_spooling_and_retries_at_reconnect_max(
    tmp_path: Path,
    server: LoopbackServer,
    servicer: RecordingTelemetry,
    make_exporter: Callable[..., StreamExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer.required_token = "right"
    token = tmp_path / "token"
    token.write_text("wrong\n")
    exporter = make_exporter(stream_config(tmp_path, server.target, token_file=str(token)))
    feed(exporter, 0, 0.0)
    exporter.flush()
    exporter.start()
    wait_until(lambda: servicer.streams >= 2, "a retry")
    assert exporter.spool.first_pending is not None and not servicer.stored
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "UNAUTHENTICATED" in r.message]
    assert len(errors) == 1 and "unknown token" in errors[0].message  # once a minute, with the server's words
    token.write_text("right\n")  # the token is read again at each connection
    wait_until(lambda: spool_empty(exporter), "delivery with the new token")
    assert servicer.metadata[-1]["authorization"] == "Bearer right"


def test_backoff_is_bounded_and_grows_with_full_jitter() -> None:
    import random

    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [backoff_s(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0.5 <= d <= ceiling for d in delays)
        if ceiling > 2:
            assert max(delays) > 0.75 * ceiling and min(delays) < 0.5 + 0.25 * ceiling  # spread over the range
    assert backoff_s(10_000, 0.5, 30.0, rng) <= 30.0


def test_stop_is_quick_with_a_stalled_aggregator_and_leaves_the_batches_spooled(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, host_root: Path
) -> None:
    servicer.stall_streams = 1000
    exporter = StreamExporter(stream_config(tmp_path, server.target), static_sampler(), host_root=host_root)
    exporter.start()
    feed(exporter, 0, 0.0)
    exporter.flush()
    wait_until(lambda: servicer.received, "the batch to be read")
    begun = time.monotonic()
    exporter.stop()
    assert time.monotonic() - begun < SHUTDOWN_BUDGET_S
    with Spool(tmp_path / "spool") as spool:
        assert [record_no for record_no, _ in spool.read_from(0)] == [1]


# --- security --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["host-a"])


def tls_server(servicer: RecordingTelemetry, pki: Pki, client_auth: bool) -> LoopbackServer:
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes() if client_auth else None,
        require_client_auth=client_auth,
    )
    return LoopbackServer(servicer, credentials=credentials)


def test_tls_with_the_ca_file_and_the_token(
    tmp_path: Path, pki: Pki, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    server = tls_server(servicer, pki, client_auth=False)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    try:
        config = stream_config(
            tmp_path, f"localhost:{server.port}", ca_file=str(pki.ca_cert), token_file=str(token), compression="gzip"
        )
        assert config.uses_tls
        exporter = make_exporter(config)
        feed(exporter, 0, 0.0)
        exporter.flush()
        exporter.start()
        wait_until(lambda: spool_empty(exporter), "delivery over TLS")
    finally:
        server.stop()
    assert servicer.metadata[0]["authorization"] == "Bearer s3cret"


def test_mtls_presents_the_client_certificate(
    tmp_path: Path, pki: Pki, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    server = tls_server(servicer, pki, client_auth=True)
    client = pki.clients["host-a"]
    try:
        exporter = make_exporter(
            stream_config(
                tmp_path,
                server.target,
                ca_file=str(pki.ca_cert),
                cert_file=str(client.cert),
                key_file=str(client.key),
                server_name="localhost",
            )
        )
        feed(exporter, 0, 0.0)
        exporter.flush()
        exporter.start()
        wait_until(lambda: spool_empty(exporter), "delivery over mTLS")
    finally:
        server.stop()
    assert servicer.peers[0] == [b"host-a"]


def test_mtls_without_a_client_certificate_never_delivers(
    tmp_path: Path, pki: Pki, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    server = tls_server(servicer, pki, client_auth=True)
    try:
        exporter = make_exporter(stream_config(tmp_path, server.target, ca_file=str(pki.ca_cert)))
        feed(exporter, 0, 0.0)
        exporter.flush()
        exporter.start()
        wait_until(lambda: exporter.stats().sent_batches >= 1, "a send attempt")
        time.sleep(0.3)
        assert servicer.streams == 0 and not exporter.stats().connected
        assert exporter.spool.first_pending is not None
    finally:
        server.stop()


def test_a_plain_text_client_cannot_reach_a_tls_server(
    tmp_path: Path, pki: Pki, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    server = tls_server(servicer, pki, client_auth=False)
    try:
        exporter = make_exporter(stream_config(tmp_path, server.target))
        assert not exporter.settings.tls  # loopback without a CA: plain text
        feed(exporter, 0, 0.0)
        exporter.flush()
        exporter.start()
        wait_until(lambda: exporter.stats().sent_batches >= 2, "retries")
        assert servicer.streams == 0 and exporter.spool.first_pending is not None
    finally:
        server.stop()


# --- start-up errors ---------------------------------------------------------------------------------------------


def test_an_unusable_spool_dir_is_a_config_error(tmp_path: Path, host_root: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = stream_config(tmp_path, "127.0.0.1:9751", spool_dir=str(blocker / "spool"))
    with pytest.raises(ConfigError, match=r"\[stream\] spool_dir: .*spool_dir"):
        StreamExporter(config, static_sampler(), host_root=host_root)


@pytest.mark.parametrize("key", ["ca_file", "token_file"])
def test_an_unreadable_file_is_a_config_error_naming_the_key(tmp_path: Path, host_root: Path, key: str) -> None:
    config = stream_config(tmp_path, "127.0.0.1:9751", **{key: str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match=rf"\[stream\] {key}: cannot read .*missing.pem"):
        StreamExporter(config, static_sampler(), host_root=host_root)


def test_a_second_agent_on_the_same_spool_is_a_config_error(
    tmp_path: Path, make_exporter: Callable[..., StreamExporter], host_root: Path
) -> None:
    config = stream_config(tmp_path, "127.0.0.1:9751")
    make_exporter(config)
    with pytest.raises(ConfigError, match="in use by another wattmeter agent"):
        StreamExporter(config, static_sampler(), host_root=host_root)


# --- metrics and the agent ----------------------------------------------------------------------------------------


def test_stream_families_have_help_and_the_counts(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry, make_exporter: Callable[..., StreamExporter]
) -> None:
    exporter = make_exporter(stream_config(tmp_path, server.target))
    sampler = exporter.sampler
    cache = ExpositionCache(sampler, [lambda: stream_families(exporter)])
    feed(exporter, 0, 0.0)
    exporter.flush()
    before = samples(cache.body())
    assert before["wattmeter_stream_sent_batches_total"] == 0
    assert before["wattmeter_stream_spool_bytes"] > 0
    assert before["wattmeter_stream_lag_seconds"] > 0  # one batch waits
    exporter.start()
    wait_until(lambda: spool_empty(exporter), "the ack")
    sampler.version += 1  # what every sampler read does
    text = cache.body().decode()
    for name in (
        "wattmeter_stream_connected",
        "wattmeter_stream_spool_bytes",
        "wattmeter_stream_sent_batches_total",
        "wattmeter_stream_acked_batches_total",
        "wattmeter_stream_dropped_batches_total",
        "wattmeter_stream_rejected_batches_total",
        "wattmeter_stream_lag_seconds",
    ):
        assert f"# HELP {name} " in text
    after = samples(text.encode())
    assert after["wattmeter_stream_connected"] == 1
    assert after["wattmeter_stream_sent_batches_total"] == after["wattmeter_stream_acked_batches_total"] == 1
    assert after["wattmeter_stream_lag_seconds"] == 0
    assert after["wattmeter_stream_dropped_batches_total"] == after["wattmeter_stream_rejected_batches_total"] == 0


def test_the_agent_streams_simulated_gpus_and_workloads_and_exports_stream_metrics(
    tmp_path: Path, server: LoopbackServer, servicer: RecordingTelemetry
) -> None:
    config = load_config(
        None,
        {
            "prometheus": {"listen": "127.0.0.1:0"},
            "sources": {
                "nvml": {"enabled": False},
                "rapl": {"root": str(tmp_path / "no-rapl")},
                "cpu_model": {"enabled": False},
                "simulated": {"gpus": 2, "interval_s": 0.05},
            },
            "workloads": {"interval_s": 0.2},
            "api": {"socket": str(tmp_path / "agent.sock")},
            "stream": {
                "target": server.target,
                "spool_dir": str(tmp_path / "spool"),
                "batch_interval_s": 0.2,
                "fsync": "never",
            },
        },
        default_path=Path("/nonexistent/agent.toml"),
        environ={},
    )
    agent = Agent(config)
    assert agent.stream is not None and agent.workloads is not None
    agent.workloads.start()
    agent.stream.start()
    agent.sampler.start()
    try:
        wait_until(lambda: len(servicer.stored) >= 3, "3 batches from the agent")
        wait_until(lambda: agent.stream is not None and agent.stream.stats().acked_batches >= 3, "acks")
        body = agent.exporter.cache.body().decode()
    finally:
        agent.shutdown()
    assert samples(body.encode())["wattmeter_stream_connected"] == 1
    assert "wattmeter_gpu_energy_joules_total" in body  # the other families are still there
    devices = {s.device_id for b in servicer.stored for s in b.devices}
    assert devices == {"gpu0", "gpu1"}
    workloads = {(w.workload.workload, w.workload.phase, w.device_id) for b in servicer.stored for w in b.workloads}
    assert ("idle", "", "gpu0") in workloads  # simulated GPUs start idle
    sequences = [b.sequence for b in servicer.stored]
    assert sequences == list(range(1, len(sequences) + 1))


# --- a real agent process --------------------------------------------------------------------------------------------


def test_kill_9_mid_stream_then_restart_replays_the_spool(tmp_path: Path, servicer: RecordingTelemetry) -> None:
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[prometheus]
listen = "127.0.0.1:0"
[sources.nvml]
enabled = false
[sources.rapl]
root = "{tmp_path / "no-rapl"}"
[sources.cpu_model]
enabled = false
[sources.simulated]
gpus = 1
interval_s = 0.05
[workloads]
enabled = false
[stream]
target = "127.0.0.1:{port}"
spool_dir = "{tmp_path / "spool"}"
batch_interval_s = 0.1
reconnect_min_s = 0.05
reconnect_max_s = 0.2
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "collector", "agent", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    server = LoopbackServer(servicer, port)
    first = start()
    try:
        wait_until(lambda: len(servicer.stored) >= 3, "batches from the first agent")
        server.stop()  # the aggregator goes away: the agent spools
        instance = servicer.stored[0].agent_instance_id
        stored_before = len(servicer.sequences(instance))
        spooled = tmp_path / "spool"
        wait_until(lambda: sum(p.stat().st_size for p in spooled.glob("*.seg")) > 4096, "batches in the spool")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        server = LoopbackServer(servicer, port)
        second = start()
        try:
            # the spool is sent oldest first: once the second agent's own batches arrive, the replay is in
            wait_until(lambda: len({b.agent_instance_id for b in servicer.stored}) == 2, "the second agent")
        finally:
            second.terminate()
            _, errors = second.communicate(timeout=10)
        assert second.returncode == 0, errors
    finally:
        if first.poll() is None:
            first.kill()
        server.stop()
    sequences = servicer.sequences(instance)
    assert len(sequences) > stored_before  # the spooled batches came with the second agent
    assert sequences == list(range(1, len(sequences) + 1))  # nothing missing, nothing twice
