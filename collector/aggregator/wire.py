"""Where a Batch's packed sample arrays lie in its bytes, so they are read as they are (one ``np.frombuffer`` per
kind, and stored as the same bytes) instead of one Python float per value through the parsed message.

Packed ``fixed64`` and ``double`` arrays on the wire are little-endian 8-byte values: the store's blob format. The
scan reads only what the wire format says (tags, lengths); the message itself is parsed by protobuf, and anything
the scan does not expect (an array sent unpacked or in two pieces, a group, a bad length) makes it give up, and the
caller reads the parsed message's fields instead. So the arrays are always what protobuf parses.

An agent sends the same series every second, so a ``Template`` of a scanned batch finds the same layout in the
next one by comparing the bytes around the arrays (tags, lengths, names), which costs less than scanning again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# field numbers (collector/proto/wattmeter.proto)
BATCH_DEVICES = 7
BATCH_WORKLOADS = 8
DEVICE_ARRAYS = (4, 5, 6)  # DeviceSeries: time_ns, energy_j, power_w
WORKLOAD_ARRAYS = (3, 4, 0)  # WorkloadSeries: time_ns, energy_j (and no power: field 0 does not exist)
VALUE_BYTES = 8

Span = tuple[int, int]  # (start, end) of a series' submessage in the Batch
Ranges = list[int]  # (start, end) of each array in turn (time, energy, power), byte offsets; (0, 0) when absent


@dataclass(frozen=True)
class Spans:
    devices: list[Span]
    workloads: list[Span]
    block: Span | None = None  # the series' fields, when they follow one another: (first's tag, last's end)


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


def _arrays(data: bytes, pos: int, stop: int, time_field: int, energy_field: int, power_field: int) -> Ranges:
    """The (start, end) of a series' arrays, from its submessage ``data[pos:stop]``. Written out flat: this loop
    runs for every field of every series of a batch no ``Template`` matches."""
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


def _field(data: bytes, pos: int) -> tuple[int, bool, int, int]:
    """The field at ``pos``: (number, length-delimited, payload start, end); a field of another wire type has
    payload start == end == where it ends."""
    key = data[pos]
    if key < 0x80:
        pos += 1
    else:
        key, pos = _varint(data, pos)
    if key & 7 == 2:
        length = data[pos]
        if length < 0x80:
            pos += 1
        elif data[pos + 1] < 0x80:  # a series of up to 16 KiB
            length = (length & 0x7F) | data[pos + 1] << 7
            pos += 2
        else:
            length, pos = _varint(data, pos)
        return key >> 3, True, pos, pos + length
    end = _skip(data, pos, key & 7)
    return key >> 3, False, end, end


def spans(data: bytes) -> Spans | None:
    """Where each series' submessage is, in order; None when the encoding is not the plain one."""
    devices: list[Span] = []
    workloads: list[Span] = []
    pos, end = 0, len(data)
    block: Span | None = None  # from the first series' tag to the last series' end, while nothing else is between
    contiguous = True
    try:
        while pos < end:
            number, delimited, start, after = _field(data, pos)
            if number in (BATCH_DEVICES, BATCH_WORKLOADS):
                if not delimited:
                    raise _Unexpected
                (devices if number == BATCH_DEVICES else workloads).append((start, after))
                if block is None:
                    block = (pos, after)
                elif block[1] == pos:
                    block = (block[0], after)
                else:
                    contiguous = False
            pos = after
    except (_Unexpected, IndexError):
        return None
    if pos != end:
        return None
    return Spans(devices, workloads, block if contiguous else None)


def scan(data: bytes, found: Spans | None = None) -> Layout | None:
    """The arrays of every series in ``data`` (a Batch protobuf has parsed), in order; None when the encoding is
    not the plain one (then read the parsed message). ``found``: ``spans(data)``, when known."""
    found = spans(data) if found is None else found
    if found is None:
        return None
    try:
        return Layout(
            [_arrays(data, start, stop, *DEVICE_ARRAYS) for start, stop in found.devices],
            [_arrays(data, start, stop, *WORKLOAD_ARRAYS) for start, stop in found.workloads],
        )
    except (_Unexpected, IndexError):
        return None


def _block_start(data: bytes) -> int | None:
    """Where the first series' field starts, and the fields before it as the plain encoding has them."""
    pos, end = 0, len(data)
    try:
        while pos < end:
            number, _, _, after = _field(data, pos)
            if number in (BATCH_DEVICES, BATCH_WORKLOADS):
                return pos
            pos = after
    except (_Unexpected, IndexError):
        return None
    return None


def _no_series_after(data: bytes, pos: int) -> bool:
    end = len(data)
    try:
        while pos < end:
            number, _, _, after = _field(data, pos)
            if number in (BATCH_DEVICES, BATCH_WORKLOADS):
                return False
            pos = after
    except (_Unexpected, IndexError):
        return False
    return pos == end


@dataclass(frozen=True)
class Template:
    """The series of a scanned batch, one after another (a block), as bytes: every byte of the block but the
    arrays' values (tags, lengths, names, ids: ``text``), and where the arrays are in it."""

    length: int
    devices: int  # the first this many series are devices
    relative: npt.NDArray[np.int64]  # per series: its arrays' (start, end), from the block's start
    outside: npt.NDArray[np.int32]  # the offsets of the block's bytes outside the arrays
    text: bytes  # those bytes

    @classmethod
    def of(cls, data: bytes, found: Spans, layout: Layout) -> Template | None:
        if found.block is None:
            return None
        base, end = found.block
        relative: list[list[int]] = []  # an empty or absent array: (0, 0)
        inside = np.zeros(end - base, dtype=bool)
        for ranges in layout.devices + layout.workloads:
            row = [0] * 6
            for i in (0, 2, 4):
                if ranges[i + 1] > ranges[i]:
                    row[i], row[i + 1] = ranges[i] - base, ranges[i + 1] - base
                    inside[row[i] : row[i + 1]] = True
            relative.append(row)
        outside = np.flatnonzero(~inside).astype(np.int32)
        text = np.frombuffer(data, dtype=np.uint8, count=end - base, offset=base)[outside].tobytes()
        return cls(end - base, len(layout.devices), np.array(relative, dtype=np.int64).reshape(-1, 6), outside, text)

    def match(self, data: bytes) -> Layout | None:
        """``scan(data)`` when ``data`` has this block (the same bytes but the arrays' values: then scanning it
        would read the same tags and lengths) and no series after it; else None."""
        base = _block_start(data)
        if base is None or base + self.length > len(data):
            return None
        block = np.frombuffer(data, dtype=np.uint8, count=self.length, offset=base)
        if block[self.outside].tobytes() != self.text or not _no_series_after(data, base + self.length):
            return None
        absolute = np.where(self.relative > 0, self.relative + base, 0).tolist()
        return Layout(absolute[: self.devices], absolute[self.devices :])
