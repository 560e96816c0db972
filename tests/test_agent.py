from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from collector.agent import SHUTDOWN_BUDGET_S, Agent, open_sources
from collector.config import AgentConfig, load_config
from collector.readings import DeviceInfo, DeviceReading
from collector.sampler import SourceState
from collector.sources.base import Source
from tests.fakes.powercap import FakePowercap, typical_server


def config_for(rapl_root: Path, cpu_model: bool | str = "auto", gpus: int = 0) -> AgentConfig:
    return load_config(
        None,
        {
            "sources": {
                "nvml": {"enabled": False},
                "rapl": {"root": str(rapl_root)},
                "cpu_model": {"enabled": cpu_model},
                "simulated": {"gpus": gpus},
            }
        },
        default_path=Path("/nonexistent/agent.toml"),
        environ={},
    )


def names(sources: Iterable[Source]) -> list[str]:
    return [s.name for s in sources]


def test_rapl_readable_means_no_estimate(tmp_path: Path) -> None:
    tree = typical_server(tmp_path, packages=1)
    opened, retry = open_sources(config_for(tree.class_dir))
    assert names(opened) == ["rapl"] and not retry


def test_no_rapl_means_estimate(tmp_path: Path) -> None:
    opened, retry = open_sources(config_for(tmp_path / "none"))
    assert names(opened) == ["model"] and not retry


def test_unreadable_rapl_is_retried_and_the_estimate_stands_in(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path)
    zone = tree.add_zone("0", "package-0")
    os.unlink(zone.path / "energy_uj")
    os.mkdir(zone.path / "energy_uj")  # reading it fails: EISDIR
    opened, retry = open_sources(config_for(tree.class_dir))
    assert names(opened) == ["model"]
    assert names(retry) == ["rapl"] and "energy_uj" in next(iter(retry.values()))


def test_simulated_gpus_leave_the_cpu_to_real_sources(tmp_path: Path) -> None:
    opened, _ = open_sources(config_for(tmp_path / "none", gpus=2))
    assert names(opened) == ["simulated", "model"]  # no RAPL: the labelled estimate, never a simulated CPU
    tree = typical_server(tmp_path / "rapl", packages=1)
    opened, _ = open_sources(config_for(tree.class_dir, gpus=2))
    assert names(opened) == ["rapl", "simulated"]


def test_a_simulated_cpu_never_stands_beside_rapl(tmp_path: Path) -> None:
    tree = typical_server(tmp_path, packages=1)
    config = config_for(tree.class_dir, gpus=1)
    config.sources.simulated.cpu = True
    opened, _ = open_sources(config)
    simulated = next(s for s in opened if s.name == "simulated")
    assert [d.device_id for d in simulated.devices()] == ["gpu0"]
    config = config_for(tmp_path / "none", gpus=1)
    config.sources.simulated.cpu = True
    opened, _ = open_sources(config)
    assert names(opened) == ["simulated"]  # asked for: it stands in for the CPU, and the estimate stays off


def test_the_estimate_retires_once_rapl_becomes_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("collector.sampler.OPEN_RETRY_MIN_S", 0.05)
    tree = FakePowercap(tmp_path)
    zone = tree.add_zone("0", "package-0")
    energy = zone.path / "energy_uj"
    energy.unlink()
    energy.mkdir()  # unreadable for now
    config = config_for(tree.class_dir)
    config.prometheus.listen = "127.0.0.1:0"
    config.sources.cpu_model.interval_s = 0.05
    agent = Agent(config)
    assert [s.name for s in agent.states] == ["model", "rapl"]
    agent.sampler.start()
    try:
        time.sleep(0.2)
        assert [s.name for s in agent.states] == ["model", "rapl"]
        energy.rmdir()
        energy.write_text("5000000\n")  # someone fixed the permissions
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and [s.name for s in agent.states] != ["rapl"]:
            time.sleep(0.02)
        assert [s.name for s in agent.states] == ["rapl"]
        assert agent.states[0].up
    finally:
        agent.shutdown()


class HangingSource(Source):
    name = "hanging"
    interval_s = 0.05

    def __init__(self) -> None:
        self.release = threading.Event()

    def devices(self) -> Sequence[DeviceInfo]:
        return []

    def read(self) -> Sequence[DeviceReading]:
        self.release.wait(30)
        return []

    def close(self) -> None:
        self.release.wait(30)  # a driver that hangs in close too


def test_shutdown_keeps_its_budget_with_a_hung_read_and_close(tmp_path: Path) -> None:
    config = config_for(tmp_path / "none")
    config.prometheus.listen = "127.0.0.1:0"
    agent = Agent(config)
    hanging = HangingSource()
    agent.sampler.states.append(SourceState(hanging))
    agent.sampler.mark_opened(agent.sampler.states[-1])
    agent.sampler.start()
    agent.exporter.start()
    time.sleep(0.2)
    begun = time.monotonic()
    try:
        agent.shutdown()
        assert time.monotonic() - begun < SHUTDOWN_BUDGET_S + 0.2
    finally:
        hanging.release.set()
