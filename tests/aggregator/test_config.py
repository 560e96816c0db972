"""The aggregator's configuration: defaults, the plain-text rule, tokens, durations, env and CLI precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from collector.aggregator.config import (
    AGGREGATOR_EXAMPLE,
    AggregatorConfig,
    load_aggregator_config,
    parse_duration,
)
from collector.cli import main
from collector.config import check_file
from collector.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
HASH = "sha256:" + "ab" * 32


def validate(**data: Any) -> AggregatorConfig:
    return AggregatorConfig.model_validate(data)


def test_default_listen_needs_tls_or_insecure() -> None:
    with pytest.raises(ValidationError, match="set tls_cert and tls_key"):
        validate()
    assert validate(grpc={"insecure": True}).grpc.listen == "0.0.0.0:9751"
    tls = validate(grpc={"tls_cert": "/c.pem", "tls_key": "/k.pem"})
    assert (tls.grpc.listen, tls.http.listen) == ("0.0.0.0:9751", "0.0.0.0:9752")
    assert tls.storage.url == "sqlite:////var/lib/wattmeter/aggregator.db"


@pytest.mark.parametrize("listen", ["127.0.0.1:9751", "[::1]:9751", "localhost:9751", "127.0.0.2:1"])
def test_plain_text_on_loopback(listen: str) -> None:
    assert validate(grpc={"listen": listen}).grpc.listen == listen


@pytest.mark.parametrize(
    ("grpc", "words"),
    [
        ({"listen": "10.0.0.5:9751"}, "without TLS"),
        ({"listen": "127.0.0.1:9751", "tls_cert": "/c.pem"}, "tls_cert and tls_key must be set together"),
        ({"listen": "127.0.0.1:9751", "client_ca": "/ca.pem"}, "client_ca (mTLS) needs tls_cert"),
        ({"listen": "127.0.0.1:9751", "agent_tokens": {"host-a": "plaintext-token"}}, "never the token itself"),
        ({"listen": "127.0.0.1:9751", "agent_tokens": {"": HASH}}, "a hostname is empty"),
        ({"listen": "127.0.0.1:9751", "max_message_bytes": 10}, "greater than or equal"),
        ({"listen": "nonsense"}, "is not host:port"),
    ],
)
def test_grpc_errors(grpc: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as raised:
        validate(grpc=grpc)
    assert words in str(raised.value)


def test_tokens_accepted() -> None:
    config = validate(grpc={"listen": "127.0.0.1:1", "agent_tokens": {"host-a": HASH}})
    assert config.grpc.agent_tokens == {"host-a": HASH}


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("400d", 400 * 86400.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("storage", "words"),
    [
        ({"raw_retention": "1 hour"}, "is not a duration"),
        ({"rollup_retention": "0d"}, "more than 0"),
        ({"prune_interval": "5"}, "is not a duration"),
        ({"url": "mysql://db/x"}, "not one the aggregator can use"),
        ({"url": "sqlite:///:memory:"}, "needs a file"),
    ],
)
def test_storage_errors(storage: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as raised:
        validate(grpc={"listen": "127.0.0.1:1"}, storage=storage)
    assert words in str(raised.value)


def test_retentions_in_seconds() -> None:
    storage = validate(grpc={"listen": "127.0.0.1:1"}, storage={"raw_retention": "2h"}).storage
    assert (storage.raw_retention_s, storage.rollup_retention_s, storage.prune_interval_s) == (
        7200.0,
        400 * 86400.0,
        300,
    )


def test_example_file_is_valid_and_complete() -> None:
    example = REPO / AGGREGATOR_EXAMPLE
    assert check_file(example, AggregatorConfig, AGGREGATOR_EXAMPLE) == []
    assert main(["config", "check", "--aggregator", str(example)]) == 0


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text('[grpc]\nlisten = "127.0.0.1:1"\n[storage]\nurl = "sqlite:////file.db"\nraw_retention = "2h"\n')
    config = load_aggregator_config(
        path,
        {"storage": {"url": "sqlite:////cli.db"}},
        environ={"WATTMETER_STORAGE__URL": "sqlite:////env.db", "WATTMETER_STORAGE__RAW_RETENTION": "3h"},
    )
    assert (config.storage.url, config.storage.raw_retention) == ("sqlite:////cli.db", "3h")
    assert config.grpc.listen == "127.0.0.1:1"


def test_errors_name_where_the_value_came_from(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text('[grpc]\nlisten = "127.0.0.1:1"\nlisen = "x"\n')
    with pytest.raises(ConfigError) as raised:
        load_aggregator_config(path, environ={"WATTMETER_INGEST__MAX_FUTURE_S": "-1"})
    lines = str(raised.value).splitlines()
    assert f"{path}: grpc.lisen: unknown key (check the spelling; see {AGGREGATOR_EXAMPLE} for every key)" in lines
    assert any(line.startswith("environment WATTMETER_INGEST__MAX_FUTURE_S: ingest.max_future_s") for line in lines)


def test_missing_default_file_means_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without TLS"):
        load_aggregator_config(None, default_path=tmp_path / "none.toml", environ={})
    config = load_aggregator_config(
        None, default_path=tmp_path / "none.toml", environ={"WATTMETER_GRPC__INSECURE": "true"}
    )
    assert config.grpc.insecure is True
