"""The frames between the aggregator and its check worker processes, over their stdin and stdout pipes.

Request: ``<QqI`` (number, received_ns, length) and the batch's bytes. Answer: ``<QI`` (number, length), a kind
byte and its value: ``CHECKED`` and ``checks.to_wire`` of a ``Checked``; pickled, ``REFUSED`` and (class name,
message) of a ``StreamRefused``, ``FAILED`` and a message (a bug in the checks), or, numbered 0 and sent first,
``READY`` and the worker's pid. Both ends are the same code, started together: what is unpickled or unmarshalled
only ever comes from a worker this aggregator started.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

REQUEST = struct.Struct("<QqI")
ANSWER = struct.Struct("<QI")
CHECKED = b"c"
REFUSED = b"r"
FAILED = b"f"
READY = b"o"


def request(number: int, received_ns: int, data: bytes) -> bytes:
    return REQUEST.pack(number, received_ns, len(data)) + data


def encode(number: int, payload: bytes) -> bytes:
    return ANSWER.pack(number, len(payload)) + payload


def _exactly(stream: BinaryIO, size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_request(stream: BinaryIO) -> tuple[int, int, bytes] | None:
    """The next request, or None at the end of the stream (the aggregator closed it)."""
    header = _exactly(stream, REQUEST.size)
    if header is None:
        return None
    number, received_ns, size = REQUEST.unpack(header)
    data = _exactly(stream, size)
    if data is None:
        return None
    return number, received_ns, data


class AnswerReader:
    """Splits what a worker writes into answers: ``feed`` bytes as they come, get (number, payload) pairs."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        at = 0
        while len(buffer) - at >= ANSWER.size:
            number, size = ANSWER.unpack_from(buffer, at)
            end = at + ANSWER.size + size
            if len(buffer) < end:
                break
            out.append((number, bytes(buffer[at + ANSWER.size : end])))
            at = end
        if at:
            del buffer[:at]
        return out
