"""Fuzzing the ingest through the real gRPC servicer and SQLite: random bytes and mutated valid Batch bytes.

The server never crashes, and what it stores only changes by batches that are valid: after each example the
stored totals are either unchanged or grew by exactly that batch's samples, and then the batch passes the checks
written out again here, independently of the aggregator's code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.proto import wattmeter_pb2 as pb
from tests.aggregator.conftest import RunningAggregator, base_config, now_ns, send, simple_batch

SECOND = 1_000_000_000
FAR = 2**62
_instances = itertools.count(1)
Fuzzed = tuple[RunningAggregator, grpc.Channel]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    running = RunningAggregator(base_config(directory))
    channel = grpc.insecure_channel(running.target)
    try:
        yield running, channel
    finally:
        channel.close()
        running.stop()


def totals(running: RunningAggregator) -> tuple[int, int]:
    """(device samples, workload samples) stored, over every host, device and workload."""
    store = running.aggregator.store
    devices = sum(
        len(store.device_samples(host.hostname, d.device_id, 0, FAR)) for host in store.hosts() for d in host.devices
    )
    workloads = sum(
        len(store.workload_samples(row.hostname, (row.workload, row.phase, row.job), device_id, 0, FAR))
        for row in store.workload_energy(0, FAR)
        if row.workload
        for device_id in row.by_device_j
    )
    return devices, workloads


def _series_ok(times: list[int], energy: list[float], latest_ns: int) -> bool:
    return (
        len(times) == len(energy)
        and all(0 < t <= latest_ns for t in times)
        and all(b > a for a, b in itertools.pairwise(times))
        and all(math.isfinite(e) and e >= 0 for e in energy)
        and all(b >= a for a, b in itertools.pairwise(energy))
    )


def looks_valid(batch: pb.Batch) -> bool:
    """The rules the aggregator must enforce, written out independently."""
    latest = now_ns() + 300 * SECOND
    device_ids = {d.device_id for d in batch.devices}
    return (
        batch.protocol_major == 1
        and bool(batch.agent_instance_id)
        and batch.sequence > 0
        and bool(batch.host.hostname)
        and len(device_ids) == len(batch.devices)
        and all(d.kind in ("gpu", "cpu", "dram") and d.device_id for d in batch.devices)
        and all(_series_ok(list(d.time_ns), list(d.energy_j), latest) for d in batch.devices)
        and all(_series_ok(list(w.time_ns), list(w.energy_j), latest) for w in batch.workloads)
        and all(w.device_id in device_ids and w.workload.workload for w in batch.workloads)
    )


def check_one(running: RunningAggregator, channel: grpc.Channel, data: bytes) -> None:
    before = totals(running)
    result = send(channel, [data])
    after = totals(running)
    if after == before:
        return
    assert result.code is None, f"stored something, then failed the stream: {result.details}"
    (ack,) = result.acks
    assert ack.rejected_sequence == 0
    batch = pb.Batch.FromString(data)
    assert looks_valid(batch), f"stored an invalid batch: {batch}"
    grown = (after[0] - before[0], after[1] - before[1])
    assert grown == (sum(len(d.time_ns) for d in batch.devices), sum(len(w.time_ns) for w in batch.workloads))


def valid_bytes() -> bytes:
    return simple_batch(1, now_ns() - 5 * SECOND, instance=f"fuzz-{next(_instances)}").SerializeToString()


mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 10_000), st.binary(min_size=1, max_size=4)
)


def mutate(data: bytes, mutations: list[tuple[str, int, bytes]]) -> bytes:
    for kind, position, value in mutations:
        at = position % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ (value[0] or 1)]) + data[at + 1 :]
        elif kind == "insert":
            data = data[:at] + value + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + len(value) :]
        elif kind == "truncate":
            data = data[:at]
    return data


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes(fuzzed: Fuzzed, data: bytes) -> None:
    check_one(*fuzzed, data)


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_batches(
    fuzzed: tuple[RunningAggregator, grpc.Channel], mutations: list[tuple[str, int, bytes]]
) -> None:
    check_one(*fuzzed, mutate(valid_bytes(), mutations))


index = st.integers(0, 9)
any_float = st.floats(allow_nan=True, allow_infinity=True)
time_shift = st.one_of(st.integers(-2 * SECOND, 2 * SECOND), st.sampled_from([-(2**63), 2**63, 600 * SECOND]))
field_change = st.one_of(
    st.tuples(st.just("device_energy"), index, any_float),
    st.tuples(st.just("workload_energy"), index, any_float),
    st.tuples(st.just("power"), index, any_float),
    st.tuples(st.just("device_time"), index, time_shift),
    st.tuples(st.just("workload_time"), index, time_shift),
    st.tuples(st.just("kind"), index, st.text(max_size=4)),
    st.tuples(st.just("phase"), index, st.text(max_size=9)),
    st.tuples(st.just("drop"), index, st.sampled_from(["device_energy", "workload_time", "power", "device"])),
)


def change_fields(data: bytes, changes: list[tuple[str, int, object]]) -> bytes:
    batch = pb.Batch.FromString(data)
    train = batch.workloads[0]
    for name, at, value in changes:
        if not batch.devices:
            break
        gpu = batch.devices[0]
        arrays: dict[str, Any] = {
            "device_energy": gpu.energy_j,
            "workload_energy": train.energy_j,
            "power": gpu.power_w,
            "device_time": gpu.time_ns,
            "workload_time": train.time_ns,
        }
        if name in arrays:
            values = arrays[name]
            if not values:
                continue
            at %= len(values)
            if name.endswith("_time"):
                values[at] = min(max(values[at] + int(str(value)), 0), 2**64 - 1)
            else:
                values[at] = value
        elif name == "kind":
            gpu.kind = str(value)
        elif name == "phase":
            train.workload.phase = str(value)
        elif value == "device":
            del batch.devices[0]
        elif arrays[str(value)]:
            del arrays[str(value)][at % len(arrays[str(value)])]
    return batch.SerializeToString()


@FUZZ
@given(changes=st.lists(field_change, min_size=1, max_size=3))
def test_changed_fields(fuzzed: Fuzzed, changes: list[tuple[str, int, object]]) -> None:
    check_one(*fuzzed, change_fields(valid_bytes(), changes))


def test_server_still_stores_after_fuzzing(fuzzed: Fuzzed) -> None:
    running, channel = fuzzed
    before = totals(running)
    result = send(channel, [valid_bytes()])
    assert result.code is None
    assert result.acks[0].acked_sequence == 1
    assert totals(running) == (before[0] + 10, before[1] + 20)
    # nothing stored is garbage (series of several instances overlap in time here, so only values are checked)
    store = running.aggregator.store
    latest = now_ns() + 300 * SECOND
    for host in store.hosts():
        for d in host.devices:
            for t, e, p in store.device_samples(host.hostname, d.device_id, 0, FAR):
                assert 0 < t <= latest
                assert math.isfinite(e)
                assert p is None or (math.isfinite(p) and p >= 0)


def test_decode_of_garbage_is_what_the_fuzzer_assumes() -> None:
    # the fuzzer's oracle parses what was stored: bytes the server parsed must parse here too
    with pytest.raises(DecodeError):
        pb.Batch.FromString(b"\xff\xff\xff\xff")
