"""Span chunks: the columns of a write's spans in one row, read back exactly; a damaged chunk is an error."""

from __future__ import annotations

import pytest

from collector.store.base import SpanColumns, SpanRow
from collector.store.span_chunks import ChunkError, decode, encode, overlapping, windows

S = 1_000_000_000


def spans() -> SpanColumns:
    return SpanColumns.of(
        [
            SpanRow("r1", "s1", "h", 10 * S, 12 * S, "vllm", 42, "svc", "llama", "acme", 100, 7, 11 * S, 11 * S + 1,
                    {"a": "b"}, 13 * S),
            SpanRow("🔋" * 3, "", "h", 2**62, 2**62 + 5, model="", labels={"x": "\0y"}),
            SpanRow("r3", "s3", "h", 1, 2, pid=2**40, input_tokens=2**31, output_tokens=0),
        ]
    )  # fmt: skip


def test_a_chunk_reads_back_every_column_exactly() -> None:
    original = spans()
    assert decode(encode(original), "h") == original
    one = original.take([2])
    assert decode(encode(one), "other").hostname == ["other"]
    assert decode(encode(one), "other").request_id == ["r3"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:10], "shorter than its header"),
        (lambda data: b"XXXX" + data[4:], "starts b'XXXX'"),
        (lambda data: data[:-1], "not what its header says"),
        (lambda data: data + b"\0" * 8, "not what its header says"),
    ],
)
def test_a_damaged_chunk_is_an_error_that_says_so(damage, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ChunkError, match=message):
        decode(damage(encode(spans())), "h")


def test_a_chunk_with_a_text_value_split_in_two_is_an_error() -> None:
    data = bytearray(encode(spans().take([0])))
    at = data.index(b"r1")
    data[at + 1 : at + 1] = b""  # same length: replace a character of the request id with NUL
    data[at + 1] = 0
    with pytest.raises(ChunkError, match="has 2 values of request_id"):
        decode(bytes(data), "h")


def test_overlapping_positions_and_merged_windows() -> None:
    columns = spans()
    assert overlapping(columns, 11 * S, 20 * S) == [0]
    assert overlapping(columns, 0, 2) == [2]
    assert overlapping(columns, 3, 9 * S) == []
    assert windows([(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]) == [(1, 9), (20, 30)]
    assert windows([]) == []
