"""Fixtures of the registration server tests: real servers on a Unix socket in tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from collector.registration import RegistrationServer
from tests.fakes.registration_world import Recorder


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "agent.sock"  # the directory does not exist yet: start() creates it


@pytest.fixture
def make_server(socket_path: Path, recorder: Recorder) -> Iterator[Callable[..., RegistrationServer]]:
    """Started servers whose callbacks go to ``recorder`` unless given; all stopped at the end."""
    servers: list[RegistrationServer] = []

    def make(**kwargs: object) -> RegistrationServer:
        kwargs.setdefault("on_register", recorder.on_register)
        kwargs.setdefault("on_disconnect", recorder.on_disconnect)
        kwargs.setdefault("on_span", recorder.on_span)
        server = RegistrationServer(socket_path, **kwargs)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., RegistrationServer]) -> RegistrationServer:
    return make_server()
