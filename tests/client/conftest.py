"""Fixtures of the client tests: a real registration server on a Unix socket in tmp_path and a fresh client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import collector.client as client
from collector.registration import RegistrationServer
from tests.fakes.client_world import make_server
from tests.fakes.registration_world import Recorder


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


@pytest.fixture
def fresh_client(monkeypatch: pytest.MonkeyPatch, socket_path: Path) -> Iterator[client._Client]:
    """A new process-wide client state (fast retries), pointed at ``socket_path``, counters at 0."""
    state = client._Client(retry_interval_s=0.05)
    monkeypatch.setattr(client, "_client", state)
    for counter in ("dropped", "spans_sent", "spans_dropped"):
        monkeypatch.setattr(client, counter, 0)
    monkeypatch.setenv(client.ENV_SOCKET, str(socket_path))
    yield state
    state.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(socket_path: Path, recorder: Recorder) -> Iterator[RegistrationServer]:
    srv = make_server(socket_path, recorder)
    srv.start()
    yield srv
    srv.stop()
