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


def spans(data: bytes) -> Spans | None:
    """Where each series' submessage is, in order; None when the encoding is not the plain one."""
    devices: list[Span] = []
    workloads: list[Span] = []
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
                elif data[pos + 1] < 0x80:  # a series of up to 16 KiB
                    length = (length & 0x7F) | data[pos + 1] << 7
                    pos += 2
                else:
                    length, pos = _varint(data, pos)
                stop = pos + length
                if number == BATCH_DEVICES:
                    devices.append((pos, stop))
                elif number == BATCH_WORKLOADS:
                    workloads.append((pos, stop))
                pos = stop
            elif number in (BATCH_DEVICES, BATCH_WORKLOADS):
                raise _Unexpected
            else:
                pos = _skip(data, pos, key & 7)
    except (_Unexpected, IndexError):
        return None
    if pos != end:
        return None
    return Spans(devices, workloads)


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


@dataclass(frozen=True)
class Template:
    """A scanned batch's layout, relative to each series' submessage, and the bytes around its arrays."""

    lengths: list[int]  # of the submessages: devices, then workloads
    devices: int  # how many are devices
    relative: list[Ranges]  # array ranges from the submessage's start
    around: list[list[Span]]  # the rest of each submessage, relative
    text: bytes  # the rest of every submessage, joined

    @classmethod
    def of(cls, data: bytes, found: Spans, layout: Layout) -> Template:
        relative: list[Ranges] = []
        around: list[list[Span]] = []
        for (start, stop), ranges in zip(
            found.devices + found.workloads, layout.devices + layout.workloads, strict=True
        ):
            relative.append([at - start if at else 0 for at in ranges])
            pieces: list[Span] = []
            at = 0
            for first, last in sorted(
                (ranges[i] - start, ranges[i + 1] - start) for i in (0, 2, 4) if ranges[i + 1] > ranges[i]
            ):
                if first > at:
                    pieces.append((at, first))
                at = last
            if stop - start > at:
                pieces.append((at, stop - start))
            around.append(pieces)
        series = found.devices + found.workloads
        return cls([b - a for a, b in series], len(found.devices), relative, around, _text(data, series, around))

    def match(self, data: bytes, found: Spans) -> Layout | None:
        """``scan(data, found)`` when ``data`` has this layout (the same submessage lengths and the same bytes
        around the arrays: then scanning it would read the same tags and lengths); else None."""
        series = found.devices + found.workloads
        if (
            len(found.devices) != self.devices
            or [b - a for a, b in series] != self.lengths
            or _text(data, series, self.around) != self.text
        ):
            return None
        absolute = [
            [start + at if at else 0 for at in ranges] for (start, _), ranges in zip(series, self.relative, strict=True)
        ]
        return Layout(absolute[: self.devices], absolute[self.devices :])


def _text(data: bytes, series: list[Span], around: list[list[Span]]) -> bytes:
    return b"".join(
        [data[start + a : start + b] for (start, _), pieces in zip(series, around, strict=True) for a, b in pieces]
    )
