"""Ingest through the real gRPC server into real SQLite: what is stored, refused, deduplicated and rolled up."""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from collector.aggregator.columns import MINUTE_NS
from collector.proto import wattmeter_pb2 as pb
from tests.aggregator.conftest import (
    AggregatorFactory,
    RunningAggregator,
    batch,
    device,
    http_get,
    now_ns,
    send,
    simple_batch,
    workload,
)

SECOND = 1_000_000_000
FAR = 2**62


def device_samples(running: RunningAggregator, device_id: str = "gpu0", host: str = "host-a") -> list[tuple]:
    return running.aggregator.store.device_samples(host, device_id, 0, FAR)


def batches_counted(running: RunningAggregator) -> dict[str, int]:
    return dict(running.aggregator.metrics.batches)


def test_valid_batch_is_stored_and_acknowledged(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    result = send(channel, [simple_batch(1, start), simple_batch(2, start + SECOND, energy0=1090.0)])
    assert result.code is None, result.details
    assert [(a.agent_instance_id, a.acked_sequence, a.rejected_sequence) for a in result.acks] == [
        ("instance-1", 1, 0),
        ("instance-1", 2, 0),
    ]
    samples = device_samples(aggregator)
    assert len(samples) == 20
    assert samples[0] == (start, 1000.0, 100.0)
    assert samples[-1][1] == 1180.0
    store = aggregator.aggregator.store
    train = store.workload_samples("host-a", ("train", "training", ""), "gpu0", 0, FAR)
    assert [e for _, e in train][:3] == [0.0, 6.0, 12.0]
    assert store.acked_sequence("instance-1") == 2
    assert batches_counted(aggregator) == {"stored": 2}
    assert aggregator.aggregator.metrics.samples_stored == 60


def test_rollups_per_minute_first_sample_adds_nothing(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    minute = (now_ns() // MINUTE_NS - 3) * MINUTE_NS
    # samples at minute+58 s, +59 s, then +61 s, +62 s (the next minute); then a second batch at +63 s
    times = [minute + 58 * SECOND, minute + 59 * SECOND, minute + 61 * SECOND, minute + 62 * SECOND]
    first = batch(
        1,
        [device("gpu0", times, [500.0, 510.0, 530.0, 540.0])],
        [workload("train", "training", "gpu0", times, [0.0, 7.0, 21.0, 28.0])],
    )
    second = batch(
        2,
        [device("gpu0", [minute + 63 * SECOND], [555.0])],
        [workload("train", "training", "gpu0", [minute + 63 * SECOND], [38.0])],
    )
    assert send(channel, [first, second]).code is None
    store = aggregator.aggregator.store
    by_minute = {
        start: {(r.workload, r.phase): r.energy_j for r in store.workload_energy(start, start + MINUTE_NS)}
        for start in (minute, minute + MINUTE_NS)
    }
    # the first sample of a new series contributes 0; the rest are deltas booked in the minute of their sample
    assert by_minute[minute] == {("", ""): 10.0, ("train", "training"): 7.0}
    assert by_minute[minute + MINUTE_NS] == {("", ""): 20.0 + 10.0 + 15.0, ("train", "training"): 14.0 + 7.0 + 10.0}


# a valid simple_batch made invalid, and words of the refusal
MUTATIONS: list[tuple[Callable[[pb.Batch], None], str]] = [
    (lambda b: b.devices[0].energy_j.__setitem__(3, -1.0), "negative"),
    (lambda b: b.devices[0].energy_j.__setitem__(3, math.nan), "not finite"),
    (lambda b: b.devices[0].energy_j.__setitem__(3, math.inf), "not finite"),
    (lambda b: b.workloads[0].energy_j.__setitem__(3, math.nan), "not finite"),
    (lambda b: b.devices[0].time_ns.__setitem__(0, 0), "time_ns 0"),
    (lambda b: b.devices[0].time_ns.__setitem__(9, now_ns() + 3600 * SECOND), "max_future_s"),
    (lambda b: b.workloads[0].time_ns.__setitem__(9, 2**64 - 1), "max_future_s"),
    (lambda b: b.devices[0].time_ns.__setitem__(5, b.devices[0].time_ns[4]), "not strictly ascending"),
    (lambda b: b.devices[0].energy_j.append(2000.0), "energy_j values for"),
    (lambda b: b.devices[0].power_w.append(5.0), "power_w values for"),
    (lambda b: b.workloads[0].energy_j.pop(), "energy_j values for"),
    (lambda b: b.devices[0].energy_j.__setitem__(5, 1001.0), "goes backwards"),
    (lambda b: b.workloads[1].energy_j.__setitem__(5, 1.0), "goes backwards"),
    (lambda b: setattr(b.devices[0], "kind", "tpu"), "unknown device kind"),
    (lambda b: setattr(b.devices[0], "device_id", ""), "device_id is empty"),
    (lambda b: setattr(b.workloads[0], "device_id", "gpu7"), "unknown device 'gpu7'"),
    (lambda b: setattr(b.workloads[0].workload, "phase", "serving"), "unknown phase"),
    (lambda b: setattr(b.workloads[0].workload, "phase", ""), "only idle, system and other"),
    (lambda b: setattr(b.workloads[0].workload, "workload", ""), "workload is empty"),
    (lambda b: b.devices.append(b.devices[0]), "appears twice"),
    (lambda b: b.workloads.append(b.workloads[0]), "appears twice"),
    (lambda b: setattr(b, "oldest_pending_sequence", 9), "oldest_pending_sequence"),
    (lambda b: setattr(b.host, "machine_id", "x" * 300), "longer than"),
    (lambda b: setattr(b.host, "hostname", "host\n-a"), "control characters"),
    (lambda b: setattr(b, "protocol_major", 0), "protocol_major is 0"),
    (lambda b: b.ClearField("host"), "hostname is empty"),
]


@pytest.mark.parametrize(("mutate", "words"), MUTATIONS)
def test_invalid_batch_is_refused_whole_and_recorded(
    aggregator: RunningAggregator, channel: grpc.Channel, mutate: Callable[[pb.Batch], None], words: str
) -> None:
    start = now_ns() - 5 * SECOND
    bad = simple_batch(1, start)
    mutate(bad)
    result = send(channel, [bad, simple_batch(2, start + SECOND, energy0=1090.0)])
    assert result.code is None, result.details  # the stream goes on
    refused, stored = result.acks
    assert refused.rejected_sequence == 1
    assert words in refused.error
    assert refused.acked_sequence == 1  # recorded as done: the watermark moved past it
    assert (stored.acked_sequence, stored.rejected_sequence) == (2, 0)
    samples = device_samples(aggregator)
    assert [t for t, _, _ in samples] == list(simple_batch(2, start + SECOND).devices[0].time_ns)  # batch 2 only
    assert batches_counted(aggregator) == {"rejected": 1, "stored": 1}


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda b: setattr(b, "agent_instance_id", ""), "agent_instance_id is empty"),
        (lambda b: setattr(b, "sequence", 0), "sequence is 0"),
    ],
)
def test_batch_without_identity_is_refused_not_recorded(
    aggregator: RunningAggregator, channel: grpc.Channel, mutate: Callable[[pb.Batch], None], words: str
) -> None:
    bad = simple_batch(1, now_ns() - 5 * SECOND)
    mutate(bad)
    result = send(channel, [bad])
    assert result.code is None, result.details
    (ack,) = result.acks
    assert ack.rejected_sequence == bad.sequence
    assert words in ack.error
    assert aggregator.aggregator.store.acked_sequence("instance-1") == 0
    assert aggregator.aggregator.store.hosts() == []


def test_counter_and_time_checked_against_the_last_stored_sample(
    aggregator: RunningAggregator, channel: grpc.Channel
) -> None:
    start = now_ns() - 10 * SECOND
    going_back = simple_batch(2, start + SECOND, energy0=1080.0)  # first 1080 J, below batch 1's last (1090)
    overlapping = simple_batch(3, start + SECOND // 2, energy0=1200.0)  # starts before batch 1's last time
    result = send(channel, [simple_batch(1, start), going_back, overlapping])
    assert result.code is None
    assert [a.rejected_sequence for a in result.acks] == [0, 2, 3]
    assert "counter went backwards" in result.acks[1].error
    assert "not after the last stored sample" in result.acks[2].error
    assert len(device_samples(aggregator)) == 10


def test_oversize_batch_refused(start_aggregator: AggregatorFactory) -> None:
    running = start_aggregator(ingest={"max_batch_samples": 25})
    with grpc.insecure_channel(running.target) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND)])  # 30 samples
    (ack,) = result.acks
    assert ack.rejected_sequence == 1
    assert "more than max_batch_samples (25)" in ack.error


def test_bad_power_is_dropped_and_counted_nan_power_kept(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    negative = simple_batch(1, start)
    negative.devices[0].power_w[2] = -5.0
    nan = simple_batch(2, start + SECOND, energy0=1090.0)
    nan.devices[0].power_w[0] = math.nan
    result = send(channel, [negative, nan])
    assert [a.rejected_sequence for a in result.acks] == [0, 0]
    samples = device_samples(aggregator)
    assert [p for _, _, p in samples[:10]] == [None] * 10  # the negative reading's array went
    assert [p for _, _, p in samples[10:12]] == [None, 100.0]  # NaN means none
    assert dict(aggregator.aggregator.metrics.dropped_fields) == {"power_w": 1}


def test_workload_on_a_device_sent_in_an_earlier_batch(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    later = batch(2, [], [workload("train", "training", "gpu0", [start + 2 * SECOND], [100.0])])
    result = send(channel, [simple_batch(1, start), later])
    assert [a.rejected_sequence for a in result.acks] == [0, 0]


def test_garbage_bytes_end_only_that_stream(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    assert send(channel, [simple_batch(1, start)]).code is None
    result = send(channel, [b"\xff\xff\xff\xff not a protobuf"])
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a wattmeter.v1.Batch" in result.details
    # the server and what it stored are untouched; a new stream works
    again = send(channel, [simple_batch(2, start + SECOND, energy0=1090.0)])
    assert again.code is None
    assert again.acks[0].acked_sequence == 2
    assert len(device_samples(aggregator)) == 20


def test_newer_protocol_refused_with_both_versions(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    newer = simple_batch(1, now_ns() - 5 * SECOND)
    newer.protocol_major = 2
    result = send(channel, [newer])
    assert result.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "protocol_major 2" in result.details
    assert "aggregator's 1" in result.details
    assert device_samples(aggregator) == []


def test_unknown_fields_are_ignored(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    data = simple_batch(1, now_ns() - 5 * SECOND).SerializeToString()
    data += b"\xa8\x06\x2a"  # field 101, varint 42: from a newer minor version
    result = send(channel, [data])
    assert result.code is None
    assert result.acks[0].acked_sequence == 1


def test_replay_after_restart_is_deduplicated(start_aggregator: AggregatorFactory) -> None:
    start = now_ns() - 20 * SECOND
    batches = [simple_batch(n, start + (n - 1) * SECOND, energy0=1000.0 + 90.0 * (n - 1)) for n in (1, 2, 3)]
    first = start_aggregator()
    with grpc.insecure_channel(first.target) as channel:
        assert [a.acked_sequence for a in send(channel, batches).acks] == [1, 2, 3]
    energy_before = dict(first.aggregator.metrics.fleet_energy)
    first.stop()

    second = start_aggregator()  # same SQLite file
    assert second.aggregator.store.acked_sequence("instance-1") == 3
    # the fleet counters go on from the rollups
    assert second.aggregator.metrics.fleet_energy == pytest.approx(energy_before)
    fourth = simple_batch(4, start + 3 * SECOND, energy0=1270.0)
    with grpc.insecure_channel(second.target) as channel:
        replay = send(channel, [*batches, fourth])
    assert replay.code is None
    assert [(a.acked_sequence, a.rejected_sequence) for a in replay.acks] == [(3, 0), (3, 0), (3, 0), (4, 0)]
    assert dict(second.aggregator.metrics.batches) == {"duplicate": 3, "stored": 1}
    samples = device_samples(second)
    assert len(samples) == 40
    assert len({t for t, _, _ in samples}) == 40
    # batch 4's first sample adds its delta from batch 3's last sample, read back from the store after the restart
    device_total = sum(
        r.by_device_j["gpu0"] for r in second.aggregator.store.workload_energy(0, FAR) if r.workload == ""
    )
    assert device_total == pytest.approx(1270.0 + 90.0 - 1000.0)


def test_gap_then_oldest_pending_moves_the_watermark(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 20 * SECOND
    third = simple_batch(3, start + 2 * SECOND, energy0=1180.0)
    result = send(channel, [simple_batch(1, start), third])
    assert [a.acked_sequence for a in result.acks] == [1, 1]  # 2 is missing
    fourth = simple_batch(4, start + 3 * SECOND, energy0=1270.0)
    fourth.oldest_pending_sequence = 3  # the agent dropped 2 from its spool
    assert send(channel, [fourth]).acks[0].acked_sequence == 4


def test_fleet_metrics(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    part = device("cpu0-core", [start, start + SECOND], [0.0, 30.0], [30.0, 30.0], kind="cpu", in_host_total=False)
    first = simple_batch(1, start)
    first.devices.append(part)
    first.workloads.append(workload("train", "training", "cpu0-core", [start, start + SECOND], [0.0, 25.0]))
    assert send(channel, [first, simple_batch(2, start + SECOND, energy0=1090.0)]).code is None
    metrics = aggregator.aggregator.metrics
    # deltas on in_host_total devices only: 9 per batch (each batch's first sample repeats the last one's energy)
    assert metrics.fleet_energy == {("host-a", "training"): 6.0 * 18, ("host-a", "idle"): 4.0 * 18}
    assert metrics.fleet_power() == {"host-a": 100.0}
    text = aggregator.aggregator.http.cache.body().decode()
    assert 'wattmeter_fleet_energy_joules_total{host="host-a",phase="training"} 108.0' in text
    assert 'wattmeter_fleet_power_watts{host="host-a"} 100.0' in text
    assert 'wattmeter_aggregator_batches_total{result="stored"} 2.0' in text
    assert "wattmeter_aggregator_stored_samples_total 64.0" in text


def test_agents_connected_counts_open_streams(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    call = channel.stream_stream(
        "/wattmeter.v1.Telemetry/Stream", request_serializer=None, response_deserializer=pb.Ack.FromString
    )
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := outbox.get()) is not None:
            yield item

    responses = call(requests(), timeout=30)
    outbox.put(simple_batch(1, now_ns() - 5 * SECOND).SerializeToString())
    assert next(responses).acked_sequence == 1
    assert aggregator.aggregator.metrics.agents_connected == 1
    outbox.put(None)
    assert list(responses) == []
    deadline = time.monotonic() + 30
    while aggregator.aggregator.metrics.agents_connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert aggregator.aggregator.metrics.agents_connected == 0


def test_spans_and_bindings_in_a_batch_are_stored_with_it(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    with_spans = simple_batch(1, start)
    with_spans.spans.append(pb.RequestSpan(request_id="r1", start_ns=start, end_ns=start + SECOND, workload="train"))
    with_spans.spans.append(pb.RequestSpan(request_id="r2", start_ns=start + SECOND, end_ns=start))  # ends first
    with_spans.spans.append(pb.RequestSpan(request_id="r3", start_ns=start, end_ns=start + 1, hostname="host-b"))
    with_spans.spans.append(pb.RequestSpan(request_id="r4", span_id="s-1", start_ns=start, end_ns=start + 5, pid=42))
    identity = pb.WorkloadIdentity(workload="train", phase="training", job="7")
    with_spans.processes.append(pb.ProcessBinding(pid=42, workload=identity))
    with_spans.processes.append(pb.ProcessBinding(pid=0, workload=identity))  # dropped
    assert send(channel, [with_spans]).acks[0].rejected_sequence == 0
    assert dict(aggregator.aggregator.metrics.spans) == {"accepted": 2, "rejected": 2}
    store = aggregator.aggregator.store
    stored = sorted(store.request_spans(["r1", "r2", "r3", "r4"]), key=lambda s: s.request_id)
    assert [(s.request_id, s.hostname, s.workload, s.pid) for s in stored] == [
        ("r1", "host-a", "train", 0),
        ("r4", "host-a", "", 42),
    ]
    assert stored[0].span_id.startswith("d-")  # derived: the span came without one
    assert stored[1].span_id == "s-1"
    assert (stored[1].start_ns, stored[1].end_ns) == (start, start + 5)
    bindings = store.process_bindings("host-a")
    assert [(b.pid, b.workload, b.phase, b.job) for b in bindings] == [(42, "train", "training", "7")]
    assert bindings[0].seen_ns == with_spans.created_ns
    pending = store.request("r1")
    assert pending is not None and pending.status == "pending"
    # the batch sent again (a replay) stores nothing twice
    assert send(channel, [with_spans]).acks[0].acked_sequence == 1
    assert len(store.request_spans(["r1", "r4"])) == 2


def test_report_spans(aggregator: RunningAggregator, channel: grpc.Channel) -> None:
    start = now_ns() - 5 * SECOND
    report = pb.SpanReport(
        spans=[
            pb.RequestSpan(request_id="a", start_ns=start, end_ns=start + SECOND, hostname="host-a"),
            pb.RequestSpan(request_id="b", start_ns=start, end_ns=start + SECOND),  # no hostname
        ]
    )
    call = channel.unary_unary(
        "/wattmeter.v1.Telemetry/ReportSpans",
        request_serializer=pb.SpanReport.SerializeToString,
        response_deserializer=pb.SpanReportResult.FromString,
    )
    result = call(report, timeout=30)
    assert (result.accepted, result.rejected) == (1, 1)
    assert "hostname is empty" in result.errors[0]
    (stored,) = aggregator.aggregator.store.request_spans(["a", "b"])  # stored before the answer
    assert (stored.request_id, stored.hostname, stored.start_ns) == ("a", "host-a", start)
    assert call(report, timeout=30).accepted == 1  # sent again: accepted, stored once
    assert len(aggregator.aggregator.store.request_spans(["a"])) == 1
    garbage = channel.unary_unary("/wattmeter.v1.Telemetry/ReportSpans")
    with pytest.raises(grpc.RpcError) as raised:
        garbage(b"\xff\xff\xff", timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_storage_failure_acknowledges_nothing_and_ends_the_stream(
    aggregator: RunningAggregator, channel: grpc.Channel
) -> None:
    start = now_ns() - 5 * SECOND
    assert send(channel, [simple_batch(1, start)]).code is None
    aggregator.aggregator.store.close()  # the real store, gone: every write now fails
    result = send(channel, [simple_batch(2, start + SECOND, energy0=1090.0)])
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert "could not store the batch" in result.details
    assert result.acks == []
    assert batches_counted(aggregator) == {"stored": 1, "error": 1}
    status, body = http_get(aggregator.http_url + "/healthz")
    assert status == 503
    assert b"storage failing" in body


def test_report_spans_answers_unavailable_when_the_store_fails(
    aggregator: RunningAggregator, channel: grpc.Channel
) -> None:
    aggregator.aggregator.store.close()  # every write now fails: the sender must hear it and send again
    start = now_ns() - 5 * SECOND
    report = pb.SpanReport(spans=[pb.RequestSpan(request_id="a", start_ns=start, end_ns=start + 1, hostname="h")])
    call = channel.unary_unary(
        "/wattmeter.v1.Telemetry/ReportSpans",
        request_serializer=pb.SpanReport.SerializeToString,
        response_deserializer=pb.SpanReportResult.FromString,
    )
    with pytest.raises(grpc.RpcError) as raised:
        call(report, timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not store the spans" in (raised.value.details() or "")
    assert dict(aggregator.aggregator.metrics.spans) == {}  # nothing counted as accepted


def test_a_new_stream_reads_what_another_aggregator_stored(start_aggregator: AggregatorFactory) -> None:
    """Two aggregators on one database: an agent's stream moves to the other and back. Each new stream re-reads
    the instance (watermark, last samples), so the rollups count every joule once."""
    start = now_ns() - 20 * SECOND
    batches = [simple_batch(n, start + (n - 1) * SECOND, energy0=1000.0 + 90.0 * (n - 1)) for n in (1, 2, 3)]
    first, second = start_aggregator(), start_aggregator()  # the same SQLite file
    with grpc.insecure_channel(first.target) as channel:
        assert send(channel, batches[:1]).acks[0].acked_sequence == 1
    with grpc.insecure_channel(second.target) as channel:
        assert send(channel, batches[1:2]).acks[0].acked_sequence == 2
    with grpc.insecure_channel(first.target) as channel:
        result = send(channel, batches[2:])
    assert [(a.acked_sequence, a.rejected_sequence) for a in result.acks] == [(3, 0)]
    store = first.aggregator.store
    device_total = sum(r.by_device_j["gpu0"] for r in store.workload_energy(0, FAR) if r.workload == "")
    assert device_total == pytest.approx(1180.0 + 90.0 - 1000.0)  # from batch 1's first sample to batch 3's last
