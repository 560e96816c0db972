"""Fixtures of the stream tests: a recording Telemetry server on loopback and a fake host root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.telemetry import BOOT_ID, MACHINE_ID, LoopbackServer, RecordingTelemetry


@pytest.fixture
def servicer() -> RecordingTelemetry:
    return RecordingTelemetry()


@pytest.fixture
def server(servicer: RecordingTelemetry) -> Iterator[LoopbackServer]:
    running = LoopbackServer(servicer)
    yield running
    running.stop()


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/machine-id").write_text(MACHINE_ID + "\n")
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text(BOOT_ID + "\n")
    return root
