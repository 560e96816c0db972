"""``checks.check`` gives one answer for one batch whichever way it gets there: packed arrays read from the
bytes or the parsed message read value by value (an encoding the scan gives up on), a shape found again or worked
out anew, in this process or marshalled back from a worker."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator

import pytest

from collector.aggregator import checks
from collector.aggregator.checks import Checked, Limits, check, from_wire, to_wire
from collector.aggregator.shape import Shapes
from collector.proto import wattmeter_pb2 as pb
from tests.aggregator.conftest import now_ns, simple_batch
from tests.aggregator.test_ingest import MUTATIONS, SECOND

LIMITS = Limits(max_future_s=300.0, max_batch_samples=1_000_000)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def unpacked(number: int, values: list[bytes]) -> bytes:
    return b"".join(varint(number << 3 | 1) + value for value in values)


def encoded_unpacked(message: pb.Batch) -> bytes:
    """``message`` with every array sent unpacked (one tagged value each): what protobuf reads the same."""
    head = pb.Batch()
    head.CopyFrom(message)
    head.ClearField("devices")
    head.ClearField("workloads")
    out = head.SerializeToString()
    for series in message.devices:
        body = field(1, series.device_id.encode()) + field(2, series.kind.encode()) + field(3, series.source.encode())
        body += unpacked(4, [struct.pack("<Q", t) for t in series.time_ns])
        body += unpacked(5, [struct.pack("<d", e) for e in series.energy_j])
        body += unpacked(6, [struct.pack("<d", p) for p in series.power_w])
        body += b"\x38\x01" if series.in_host_total else b""
        out += field(7, body)
    for wseries in message.workloads:
        body = field(1, wseries.workload.SerializeToString()) + field(2, wseries.device_id.encode())
        body += unpacked(3, [struct.pack("<Q", t) for t in wseries.time_ns])
        body += unpacked(4, [struct.pack("<d", e) for e in wseries.energy_j])
        out += field(8, body)
    assert pb.Batch.FromString(out) == message
    return out


@pytest.fixture(autouse=True)
def fresh_shapes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(checks, "_shapes", Shapes())
    yield


def same_but_size(a: Checked, b: Checked) -> None:
    assert dataclasses.replace(a, size=0) == dataclasses.replace(b, size=0)


def valid_batches(count: int) -> list[pb.Batch]:
    start = now_ns() - 60 * SECOND
    return [simple_batch(n, start + (n - 1) * SECOND, energy0=1000.0 + 90.0 * (n - 1)) for n in range(1, count + 1)]


def test_arrays_read_from_the_bytes_or_from_the_parsed_message_check_the_same() -> None:
    received = now_ns()
    for message in valid_batches(3):
        fast = check(message.SerializeToString(), received, LIMITS)
        assert fast.refusal is None and fast.rows is not None
        same_but_size(fast, check(encoded_unpacked(message), received, LIMITS))


@pytest.mark.parametrize(("mutate", "words"), MUTATIONS)
def test_a_refusal_is_the_same_from_the_bytes_or_from_the_parsed_message(
    mutate: Callable[[pb.Batch], None], words: str
) -> None:
    (message,) = valid_batches(1)
    mutate(message)
    received = now_ns()
    fast = check(message.SerializeToString(), received, LIMITS)
    slow = check(encoded_unpacked(message), received, LIMITS)
    same_but_size(fast, slow)
    if words.startswith("unknown device '"):  # needs the instance's history: ingest decides
        assert fast.lookups == [("gpu7", "workloads[0] (train/training/ on gpu7)")]
    else:
        assert fast.refusal is not None and words in fast.refusal.message


def test_a_shape_found_again_checks_like_a_shape_worked_out_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    received = now_ns()
    messages = valid_batches(4)
    kept = [check(m.SerializeToString(), received, LIMITS) for m in messages]  # 2, 3, 4 find 1's shape
    monkeypatch.setattr(checks, "_shapes", Shapes(capacity=0))  # nothing kept: every shape anew
    assert [check(m.SerializeToString(), received, LIMITS) for m in messages] == kept
    bad = messages[3]
    bad.devices[0].energy_j[2] = -1.0  # same shape, a bad value: found again, and still refused
    monkeypatch.setattr(checks, "_shapes", Shapes())
    check(messages[2].SerializeToString(), received, LIMITS)
    refused = check(bad.SerializeToString(), received, LIMITS)
    assert refused.refusal is not None and "energy_j negative" in refused.refusal.message


def test_a_shape_kept_under_a_higher_limit_is_still_held_to_the_limit() -> None:
    received = now_ns()
    first, second = valid_batches(2)
    assert check(first.SerializeToString(), received, LIMITS).refusal is None
    refused = check(second.SerializeToString(), received, Limits(300.0, 25))
    assert refused.refusal is not None
    assert "30 samples, more than max_batch_samples (25)" in refused.refusal.message


def test_checked_goes_to_another_process_and_back_unchanged() -> None:
    received = now_ns()
    message = valid_batches(1)[0]
    message.devices[0].power_w[3] = -1.0  # dropped, with a note
    message.spans.append(pb.RequestSpan(request_id="r1", start_ns=received - SECOND, end_ns=received, workload="w"))
    message.spans.append(pb.RequestSpan(request_id="", start_ns=1, end_ns=2))  # refused
    message.processes.append(pb.ProcessBinding(pid=7, workload=pb.WorkloadIdentity(workload="w", phase="inference")))
    message.processes.append(pb.ProcessBinding(pid=8))  # no workload: dropped
    for one in (message, valid_batches(2)[1]):
        checked = check(one.SerializeToString(), received, LIMITS)
        assert from_wire(to_wire(checked)) == checked
    checked = check(message.SerializeToString(), received, LIMITS)
    assert [(s.request_id, s.hostname, s.workload) for s in checked.spans] == [("r1", message.host.hostname, "w")]
    assert [(b.pid, b.workload, b.phase) for b in checked.bindings] == [(7, "w", "inference")]
    assert checked.dropped == ["power_w", "process_binding"]
    refused = valid_batches(1)[0]
    refused.devices[0].kind = "tpu"
    checked = check(refused.SerializeToString(), received, LIMITS)
    assert checked.refusal is not None
    assert from_wire(to_wire(checked)) == checked
