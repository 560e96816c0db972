"""Where a Batch's packed sample arrays lie in its bytes, so they are read as they are (one ``np.frombuffer`` per
kind, and stored as the same bytes) instead of one Python float per value through the parsed message.

Packed ``fixed64`` and ``double`` arrays on the wire are little-endian 8-byte values: the store's blob format. The
scan reads only what the wire format says (tags, lengths); the message itself is parsed by protobuf, and anything
the scan does not expect (an array sent unpacked or in two pieces, a group, a bad length) makes it give up, and the
caller reads the parsed message's fields instead. So the arrays are always what protobuf parses.
"""

from __future__ import annotations

from dataclasses import dataclass

# field numbers (collector/proto/wattmeter.proto)
BATCH_DEVICES = 7
BATCH_WORKLOADS = 8
DEVICE_ARRAYS = (4, 5, 6)  # DeviceSeries: time_ns, energy_j, power_w
WORKLOAD_ARRAYS = (3, 4, 0)  # WorkloadSeries: time_ns, energy_j (and no power: field 0 does not exist)
VALUE_BYTES = 8

Ranges = list[int]  # (start, end) of each array in turn (time, energy, power), byte offsets; (0, 0) when absent


@dataclass(frozen=True)
class Layout:
    devices: list[Ranges]  # per DeviceSeries
    workloads: list[Ranges]  # per WorkloadSeries (no power: its range stays (0, 0))


class _Unexpected(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Unexpected


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    """Past a value of ``wire_type`` other than 2 (length-delimited, which callers handle)."""
    if wire_type == 0:
        while data[pos] >= 0x80:
            pos += 1
        return pos + 1
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    raise _Unexpected  # groups (3, 4) and wire types that do not exist


def _series(data: bytes, pos: int, stop: int, time_field: int, energy_field: int, power_field: int) -> Ranges:
    """The (start, end) of a series' arrays, from its submessage ``data[pos:stop]``. Written out flat: this loop
    runs for every field of every series of every batch."""
    ranges = [0, 0, 0, 0, 0, 0]
    while pos < stop:
        key = data[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(data, pos)
        number = key >> 3
        if key & 7 == 2:
            length = data[pos]
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(data, pos)
            if number == time_field:
                slot = 0
            elif number == energy_field:
                slot = 2
            elif number == power_field:
                slot = 4
            else:
                pos += length
                continue
            if ranges[slot + 1] or length % VALUE_BYTES:  # in two pieces, or not whole values: protobuf reads it
                raise _Unexpected
            ranges[slot] = pos
            pos += length
            ranges[slot + 1] = pos
        elif number in (time_field, energy_field, power_field):  # sent unpacked: protobuf reads it
            raise _Unexpected
        else:
            pos = _skip(data, pos, key & 7)
    if pos != stop:
        raise _Unexpected
    return ranges


def scan(data: bytes) -> Layout | None:
    """The arrays of every series in ``data`` (a Batch protobuf has parsed), in order; None when the encoding is
    not the plain one (then read the parsed message)."""
    devices: list[Ranges] = []
    workloads: list[Ranges] = []
    pos, end = 0, len(data)
    try:
        while pos < end:
            key = data[pos]
            if key < 0x80:
                pos += 1
            else:
                key, pos = _varint(data, pos)
            number = key >> 3
            if key & 7 == 2:
                length = data[pos]
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = _varint(data, pos)
                stop = pos + length
                if stop > end:
                    raise _Unexpected
                if number == BATCH_DEVICES:
                    devices.append(_series(data, pos, stop, 4, 5, 6))  # DEVICE_ARRAYS
                elif number == BATCH_WORKLOADS:
                    workloads.append(_series(data, pos, stop, 3, 4, 0))  # WORKLOAD_ARRAYS
                pos = stop
            elif number in (BATCH_DEVICES, BATCH_WORKLOADS):
                raise _Unexpected
            else:
                pos = _skip(data, pos, key & 7)
    except (_Unexpected, IndexError):
        return None
    if pos != end:
        return None
    return Layout(devices, workloads)
