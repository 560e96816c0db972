from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from collector.agent import open_sources
from collector.config import AgentConfig, load_config
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


def test_simulated_cpu_stands_in_for_rapl_unless_the_estimate_is_forced(tmp_path: Path) -> None:
    opened, _ = open_sources(config_for(tmp_path / "none", gpus=2))
    assert names(opened) == ["simulated"]
    opened, _ = open_sources(config_for(tmp_path / "none", cpu_model=True, gpus=2))
    assert names(opened) == ["simulated", "model"]
