"""Request spans stored as chunks: the spans of one host from one write, as columns in one row (``span_chunks``).

A row per span cost three B-tree inserts (the table, the (request_id, span_id) key, the host and time index): 8 us
a span in SQLite with request ids in order, 15 with random ones (measured on the 2-core VM of the README's table).
A chunk of a ``ReportSpans`` call's 2,000 spans is one row: under 1 us a span. The spans of a request are found from
its row in ``requests`` (its hosts, start and end: the chunks of those hosts overlapping its time), and a span sent
twice is caught when its request is already stored (``RequestSql.write_spans``).

The data is a header, the text columns joined by NUL (the store replaces NUL in text, and labels are JSON, which
escapes it) and the integer columns as little-endian int64 arrays.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from collector.store.base import SpanColumns

MAGIC = b"WMS1"
TEXT_COLUMNS = ("request_id", "span_id", "workload", "service_name", "model", "tenant", "labels")
INT_COLUMNS = (
    "start_ns", "end_ns", "pid", "input_tokens", "output_tokens", "queue_end_ns", "prefill_end_ns", "received_ns",
)  # fmt: skip
_HEADER = struct.Struct(f"<4sI{len(TEXT_COLUMNS)}I")


class ChunkError(ValueError):
    """A chunk's data is not what ``encode`` writes (a damaged row)."""


def encode(spans: SpanColumns) -> bytes:
    """``spans`` (at least one) as a chunk's data; the hostname is the chunk row's. NUL in a text becomes U+FFFD, as
    the store writes it (a span stored before it did, moved by schema step 5, would else split its column and cost
    its whole chunk)."""
    texts = [_joined(getattr(spans, name)).encode() for name in TEXT_COLUMNS]
    ints = np.array([getattr(spans, name) for name in INT_COLUMNS], dtype="<i8")
    return _HEADER.pack(MAGIC, len(spans), *map(len, texts)) + b"".join(texts) + ints.tobytes()


def _joined(values: list[str]) -> str:
    """``values`` joined by NUL, each free of NUL itself; one scan when none holds it, as is usual."""
    joined = "\0".join(values)
    if joined.count("\0") != len(values) - 1:
        joined = "\0".join(value.replace("\0", "\ufffd") for value in values)
    return joined


def decode(data: bytes, hostname: str) -> SpanColumns:
    """The spans of a chunk's ``data``, on ``hostname``."""
    data = bytes(data)  # PostgreSQL gives memoryview
    if len(data) < _HEADER.size:
        raise ChunkError(f"a span chunk of {len(data)} bytes is shorter than its header")
    magic, n, *sizes = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ChunkError(f"a span chunk starts {magic!r}, not {MAGIC!r}")
    offset = _HEADER.size
    end_of_text = offset + sum(sizes)
    if len(data) != end_of_text + 8 * n * len(INT_COLUMNS):
        raise ChunkError(f"a span chunk of {n} spans is {len(data)} bytes long, not what its header says")
    columns: dict[str, list[Any]] = {}
    for name, size in zip(TEXT_COLUMNS, sizes, strict=True):
        values = data[offset : offset + size].decode().split("\0")
        if len(values) != n:
            raise ChunkError(f"a span chunk of {n} spans has {len(values)} values of {name}")
        columns[name] = values
        offset += size
    ints = np.frombuffer(data, dtype="<i8", offset=offset).reshape(len(INT_COLUMNS), n)
    for name, values in zip(INT_COLUMNS, ints.tolist(), strict=True):
        columns[name] = values
    return SpanColumns(hostname=[hostname] * n, **columns)


def overlapping(spans: SpanColumns, since_ns: int, until_ns: int) -> list[int]:
    """Positions of the spans of ``spans`` with end_ns >= since_ns and start_ns <= until_ns."""
    start = np.array(spans.start_ns, dtype=np.int64)
    end = np.array(spans.end_ns, dtype=np.int64)
    found: list[int] = np.flatnonzero((end >= since_ns) & (start <= until_ns)).tolist()
    return found


def windows(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` ([start, end], inclusive) merged where they overlap or touch, in order."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + 1:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged
