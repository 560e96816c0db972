"""What the registration server tests share: a recorder of its callbacks and a raw client for its socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from collector.registration import RegistrationEvent, SpanEvent


class Recorder:
    def __init__(self) -> None:
        self.events: list[RegistrationEvent] = []
        self.spans: list[SpanEvent] = []
        self.disconnects: list[int] = []

    def on_register(self, event: RegistrationEvent) -> None:
        self.events.append(event)

    def on_span(self, event: SpanEvent) -> None:
        self.spans.append(event)

    def on_disconnect(self, pid: int) -> None:
        self.disconnects.append(pid)

    def phases(self) -> list[str]:
        return [event.phase for event in self.events]


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"
