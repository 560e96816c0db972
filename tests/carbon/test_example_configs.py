"""The commented ``[carbon]`` examples in deploy/*.example.toml: valid once uncommented, naming every key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from collector.aggregator.config import AGGREGATOR_EXAMPLE, AggregatorConfig
from collector.carbon.config import CarbonConfig
from collector.config import AGENT_EXAMPLE, AgentConfig, check_file, read_toml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [(AGENT_EXAMPLE, AgentConfig), (AGGREGATOR_EXAMPLE, AggregatorConfig)]


def carbon_block(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("# [carbon]")))
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line)
    return block


def uncommented(text: str) -> str:
    block = carbon_block(text)
    return text.replace("\n".join(block), "\n".join(line.removeprefix("# ") for line in block))


@pytest.mark.parametrize(("example", "model"), EXAMPLES, ids=["agent", "aggregator"])
def test_the_carbon_example_is_valid_uncommented(tmp_path: Path, example: str, model: type[BaseModel]) -> None:
    text = (REPO / example).read_text()
    assert check_file(REPO / example, model, example) == []  # as shipped: no [carbon], no CO2 metrics
    path = tmp_path / "config.toml"
    path.write_text(uncommented(text))
    assert check_file(path, model, example) == []
    config = model.model_validate(read_toml(path))
    assert isinstance(config, AgentConfig | AggregatorConfig)
    assert config.carbon == CarbonConfig(intensity_g_per_kwh=400.0, price_per_kwh=0.25)


@pytest.mark.parametrize("example", [AGENT_EXAMPLE, AGGREGATOR_EXAMPLE])
def test_the_carbon_example_names_every_key(example: str) -> None:
    block = "\n".join(carbon_block((REPO / example).read_text()))
    missing = [name for name in CarbonConfig.model_fields if name not in block]
    assert missing == []
