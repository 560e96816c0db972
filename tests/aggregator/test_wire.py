"""The wire scan reads a Batch's packed arrays where protobuf does, or gives up: on generated batches, on every
encoding protobuf also reads (unpacked, split, reordered, unknown fields) and on mutated bytes."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.aggregator import wire
from collector.proto import wattmeter_pb2 as pb
from tests.aggregator.conftest import batch, device, workload


def parsed_arrays(message: pb.Batch) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """Each series' arrays as protobuf parsed them, as little-endian bytes."""
    devices = [
        [
            np.array(s.time_ns, dtype="<u8").tobytes(),
            np.array(s.energy_j, dtype="<f8").tobytes(),
            np.array(s.power_w, dtype="<f8").tobytes(),
        ]
        for s in message.devices
    ]
    workloads = [
        [np.array(s.time_ns, dtype="<u8").tobytes(), np.array(s.energy_j, dtype="<f8").tobytes()]
        for s in message.workloads
    ]
    return devices, workloads


def scanned_arrays(data: bytes, layout: wire.Layout) -> tuple[list[list[bytes]], list[list[bytes]]]:
    devices = [[data[r[0] : r[1]], data[r[2] : r[3]], data[r[4] : r[5]]] for r in layout.devices]
    workloads = [[data[r[0] : r[1]], data[r[2] : r[3]]] for r in layout.workloads]
    return devices, workloads


def assert_scan_reads_what_protobuf_parses(data: bytes) -> wire.Layout | None:
    message = pb.Batch.FromString(data)
    layout = wire.scan(data)
    if layout is not None:
        assert scanned_arrays(data, layout) == parsed_arrays(message)
    return layout


times = st.lists(st.integers(0, 2**64 - 1), max_size=12)
values = st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12)


@st.composite
def batches(draw: st.DrawFn) -> pb.Batch:
    devices = [
        device(f"gpu{i}", draw(times), draw(values), draw(values), in_host_total=draw(st.booleans()))
        for i in range(draw(st.integers(0, 4)))
    ]
    workloads = [
        workload(draw(st.sampled_from(["train", "idle", "x" * 200])), "training", f"gpu{i}", draw(times), draw(values))
        for i in range(draw(st.integers(0, 4)))
    ]
    return batch(draw(st.integers(1, 2**40)), devices, workloads, instance=draw(st.text(max_size=20)))


@settings(max_examples=300, deadline=None)
@given(batches())
def test_the_scan_reads_the_arrays_protobuf_parses(message: pb.Batch) -> None:
    data = message.SerializeToString()
    layout = assert_scan_reads_what_protobuf_parses(data)
    assert layout is not None  # protobuf's own encoding is the plain one


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_bytes_are_read_as_protobuf_reads_them_or_not_at_all(
    message: pb.Batch, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(message.SerializeToString())
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    try:
        pb.Batch.FromString(bytes(data))
    except Exception:
        return  # not a Batch: the aggregator refuses it before any scan
    assert_scan_reads_what_protobuf_parses(bytes(data))


def tag(field: int, wire_type: int) -> bytes:
    key, out = field << 3 | wire_type, bytearray()
    while key >= 0x80:
        out.append(key & 0x7F | 0x80)
        key >>= 7
    out.append(key)
    return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return tag(field, 2) + bytes([len(payload)]) + payload


def series_bytes(device_id: bytes, arrays: bytes) -> bytes:
    return length_delimited(7, length_delimited(1, device_id) + length_delimited(2, b"gpu") + arrays)


def test_encodings_protobuf_reads_but_the_scan_does_not_expect_make_it_give_up() -> None:
    time_ns, energy = struct.pack("<2Q", 5, 6), struct.pack("<2d", 1.0, 2.0)
    unpacked = tag(4, 1) + time_ns[:8] + tag(4, 1) + time_ns[8:] + length_delimited(5, energy)
    split = length_delimited(4, time_ns[:8]) + length_delimited(4, time_ns[8:]) + length_delimited(5, energy)
    for arrays in (unpacked, split):
        data = tag(1, 0) + b"\x01" + series_bytes(b"gpu0", arrays)
        message = pb.Batch.FromString(data)
        assert list(message.devices[0].time_ns) == [5, 6]  # protobuf reads both
        assert wire.scan(data) is None


def test_fields_in_any_order_and_unknown_fields_are_read_where_they_are() -> None:
    time_ns, energy = struct.pack("<2Q", 5, 6), struct.pack("<2d", 1.0, 2.0)
    # numbers no message of the protocol uses (Batch has fields up to 12 now)
    unknown = tag(29, 0) + b"\x2a" + tag(28, 5) + b"abcd" + tag(27, 1) + b"12345678" + length_delimited(26, b"zz")
    arrays = length_delimited(5, energy) + unknown + length_delimited(4, time_ns)
    workload_series = length_delimited(8, length_delimited(4, energy) + length_delimited(2, b"gpu0"))
    data = workload_series + unknown + series_bytes(b"gpu0", arrays) + tag(1, 0) + b"\x01"
    layout = assert_scan_reads_what_protobuf_parses(data)
    assert layout is not None
    assert (len(layout.devices), len(layout.workloads)) == (1, 1)


def test_a_template_finds_the_same_layout_in_the_next_batch_and_only_there() -> None:
    start = 1_700_000_000 * 10**9

    def one(offset: int, names: tuple[str, str] = ("gpu0", "train"), samples: int = 10) -> bytes:
        t = [start + offset + i for i in range(samples)]
        return batch(
            7 + offset,
            [device(names[0], t, [float(offset + i) for i in range(samples)], [1.0] * samples)],
            [workload(names[1], "training", names[0], t, [float(i) for i in range(samples)])],
        ).SerializeToString()

    first = one(0)
    spans = wire.spans(first)
    layout = wire.scan(first)
    assert spans is not None and layout is not None
    template = wire.Template.of(first, spans, layout)
    assert template is not None
    for later in (one(1), one(2000), one(10**9)):  # the header's varints grow: the series move
        assert template.match(later) == wire.scan(later)
    for other in (one(1, ("gpu1", "train")), one(1, ("gpu0", "infer")), one(1, samples=9)):
        assert template.match(other) is None
    # a series more after the block, or the block cut short: not this layout
    extra = pb.Batch.FromString(one(1))
    extra.workloads.append(extra.workloads[0])
    assert template.match(extra.SerializeToString()) is None
    assert template.match(one(1)[:-3]) is None
