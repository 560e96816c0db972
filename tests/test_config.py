"""The config tree: defaults, the TOML file, WATTMETER_* env vars, CLI overrides and their error messages."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from collector import tomlwrite
from collector.config import (
    AgentConfig,
    BasicAuthConfig,
    PrometheusConfig,
    StreamConfig,
    load_config,
    parse_listen,
)
from collector.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHA256_HASH = "sha256:" + hashlib.sha256(b"secret").hexdigest()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WATTMETER_* variable from the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("WATTMETER_"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def missing_default(tmp_path: Path) -> Path:
    return tmp_path / "no-such-default.toml"


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path: Path | None, missing_default: Path, overrides: dict[str, object] | None = None) -> AgentConfig:
    return load_config(path, overrides, default_path=missing_default)


# --- defaults ---------------------------------------------------------------------------------------------


def test_defaults(missing_default: Path) -> None:
    config = load(None, missing_default)
    assert config.log_level == "info"
    assert config.prometheus.listen == "0.0.0.0:9750"
    assert config.prometheus.tls_cert is None
    assert config.prometheus.tls_key is None
    assert config.prometheus.basic_auth is None
    assert config.sources.nvml.enabled is True
    assert config.sources.nvml.interval_s == 0.1
    assert config.sources.nvml.slow_interval_s == 1.0
    assert config.sources.nvml.library_path is None
    assert config.sources.rapl.enabled is True
    assert config.sources.rapl.root == Path("/sys/class/powercap")
    assert config.sources.rapl.interval_s == 0.1
    assert config.sources.cpu_model.enabled == "auto"
    assert config.sources.cpu_model.watts_per_core == 10.0
    assert config.sources.cpu_model.idle_watts == 50.0
    assert config.sources.simulated.gpus == 0
    assert config.sources.simulated.seed == 0
    assert config.sources.simulated.cpu is False
    assert config.sampler.read_timeout_s == 2.0


def test_defaults_equal_a_bare_model(missing_default: Path) -> None:
    assert load(None, missing_default) == AgentConfig.model_validate({})


def test_default_path_is_loaded_when_present(tmp_path: Path) -> None:
    default = write(tmp_path, 'log_level = "debug"\n[sources.simulated]\ngpus = 3\n', "default.toml")
    config = load_config(None, default_path=default)
    assert config.log_level == "debug"
    assert config.sources.simulated.gpus == 3


def test_missing_default_path_gives_defaults(tmp_path: Path) -> None:
    config = load_config(None, default_path=tmp_path / "nonexistent" / "agent.toml")
    assert config == AgentConfig.model_validate({})


def test_explicit_path_wins_over_default_path(tmp_path: Path) -> None:
    default = write(tmp_path, 'log_level = "debug"\n', "default.toml")
    explicit = write(tmp_path, 'log_level = "error"\n', "explicit.toml")
    assert load_config(explicit, default_path=default).log_level == "error"


# --- loading a file ---------------------------------------------------------------------------------------


FULL_FILE = f"""
log_level = "warning"

[prometheus]
listen = "127.0.0.1:9999"
tls_cert = "/etc/wattmeter/cert.pem"
tls_key = "/etc/wattmeter/key.pem"

[prometheus.basic_auth]
username = "scraper"
password_hash = "{SHA256_HASH}"

[sources.nvml]
enabled = false
interval_s = 0.25
slow_interval_s = 5.0
library_path = "/opt/nvidia/libnvidia-ml.so.1"

[sources.rapl]
root = "/host/sys/class/powercap"
interval_s = 0.5

[sources.cpu_model]
enabled = true
watts_per_core = 7.5
idle_watts = 40.0
interval_s = 2.0

[sources.simulated]
gpus = 4
seed = 42
cpu = false

[sampler]
read_timeout_s = 3.5
"""


def test_loads_every_key_from_a_file(tmp_path: Path, missing_default: Path) -> None:
    config = load(write(tmp_path, FULL_FILE), missing_default)
    assert config.log_level == "warning"
    assert config.prometheus.listen == "127.0.0.1:9999"
    assert config.prometheus.tls_cert == Path("/etc/wattmeter/cert.pem")
    assert config.prometheus.tls_key == Path("/etc/wattmeter/key.pem")
    assert config.prometheus.basic_auth == BasicAuthConfig(username="scraper", password_hash=SHA256_HASH)
    assert config.sources.nvml.enabled is False
    assert config.sources.nvml.interval_s == 0.25
    assert config.sources.nvml.slow_interval_s == 5.0
    assert config.sources.nvml.library_path == "/opt/nvidia/libnvidia-ml.so.1"
    assert config.sources.rapl.root == Path("/host/sys/class/powercap")
    assert config.sources.rapl.interval_s == 0.5
    assert config.sources.cpu_model.enabled is True
    assert config.sources.cpu_model.watts_per_core == 7.5
    assert config.sources.cpu_model.idle_watts == 40.0
    assert config.sources.cpu_model.interval_s == 2.0
    assert config.sources.simulated.gpus == 4
    assert config.sources.simulated.seed == 42
    assert config.sources.simulated.cpu is False
    assert config.sampler.read_timeout_s == 3.5


def test_partial_file_keeps_other_defaults(tmp_path: Path, missing_default: Path) -> None:
    config = load(write(tmp_path, "[sources.nvml]\ninterval_s = 0.5\n"), missing_default)
    assert config.sources.nvml.interval_s == 0.5
    assert config.sources.nvml.slow_interval_s == 1.0
    assert config.sources.nvml.enabled is True
    assert config.prometheus.listen == "0.0.0.0:9750"


def test_empty_file_gives_defaults(tmp_path: Path, missing_default: Path) -> None:
    assert load(write(tmp_path, ""), missing_default) == AgentConfig.model_validate({})


# --- precedence -------------------------------------------------------------------------------------------


PRECEDENCE_FILE = """
log_level = "warning"
[prometheus]
listen = "127.0.0.1:1111"
[sources.nvml]
interval_s = 0.3
slow_interval_s = 3.0
"""


def test_file_beats_defaults(tmp_path: Path, missing_default: Path) -> None:
    config = load(write(tmp_path, PRECEDENCE_FILE), missing_default)
    assert config.prometheus.listen == "127.0.0.1:1111"
    assert config.sources.nvml.interval_s == 0.3


def test_env_beats_file(tmp_path: Path, missing_default: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTMETER_SOURCES__NVML__INTERVAL_S", "0.2")
    monkeypatch.setenv("WATTMETER_PROMETHEUS__LISTEN", "127.0.0.1:2222")
    monkeypatch.setenv("WATTMETER_LOG_LEVEL", "debug")
    config = load(write(tmp_path, PRECEDENCE_FILE), missing_default)
    assert config.sources.nvml.interval_s == 0.2
    assert config.prometheus.listen == "127.0.0.1:2222"
    assert config.log_level == "debug"
    # keys the env does not name keep the file's values, siblings included
    assert config.sources.nvml.slow_interval_s == 3.0
    assert config.sources.nvml.enabled is True


def test_env_beats_defaults_without_a_file(missing_default: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTMETER_SOURCES__SIMULATED__GPUS", "2")
    monkeypatch.setenv("WATTMETER_SOURCES__RAPL__ENABLED", "false")
    config = load(None, missing_default)
    assert config.sources.simulated.gpus == 2
    assert config.sources.rapl.enabled is False
    assert config.sources.simulated.interval_s == 0.1


def test_cli_beats_env_and_file(tmp_path: Path, missing_default: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTMETER_PROMETHEUS__LISTEN", "127.0.0.1:2222")
    monkeypatch.setenv("WATTMETER_SOURCES__NVML__INTERVAL_S", "0.2")
    overrides = {"prometheus": {"listen": "127.0.0.1:3333"}, "log_level": "error"}
    config = load(write(tmp_path, PRECEDENCE_FILE), missing_default, overrides)
    assert config.prometheus.listen == "127.0.0.1:3333"
    assert config.log_level == "error"
    assert config.sources.nvml.interval_s == 0.2  # env, not overridden on the command line
    assert config.sources.nvml.slow_interval_s == 3.0  # file


def test_cli_override_nested_keeps_siblings(tmp_path: Path, missing_default: Path) -> None:
    overrides = {"sources": {"nvml": {"enabled": False}}}
    config = load(write(tmp_path, PRECEDENCE_FILE), missing_default, overrides)
    assert config.sources.nvml.enabled is False
    assert config.sources.nvml.interval_s == 0.3
    assert config.sources.nvml.slow_interval_s == 3.0


def test_env_can_override_one_key_of_a_tls_pair(
    tmp_path: Path, missing_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The effective config (file cert + env key) is valid; the env layer alone need not be.
    path = write(tmp_path, '[prometheus]\ntls_cert = "/etc/w/cert.pem"\ntls_key = "/etc/w/key.pem"\n')
    monkeypatch.setenv("WATTMETER_PROMETHEUS__TLS_KEY", "/run/secrets/key.pem")
    config = load(path, missing_default)
    assert config.prometheus.tls_cert == Path("/etc/w/cert.pem")
    assert config.prometheus.tls_key == Path("/run/secrets/key.pem")


def test_env_can_override_only_the_password_hash(
    tmp_path: Path, missing_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = "sha256:" + hashlib.sha256(b"rotated").hexdigest()
    path = write(tmp_path, f'[prometheus.basic_auth]\nusername = "scraper"\npassword_hash = "{SHA256_HASH}"\n')
    monkeypatch.setenv("WATTMETER_PROMETHEUS__BASIC_AUTH__PASSWORD_HASH", other)
    config = load(path, missing_default)
    assert config.prometheus.basic_auth == BasicAuthConfig(username="scraper", password_hash=other)


def test_bad_env_value_is_blamed_on_the_env_not_the_file(
    tmp_path: Path, missing_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'log_level = "debug"\n')
    monkeypatch.setenv("WATTMETER_SOURCES__NVML__INTERVAL_S", "-1")
    with pytest.raises(ConfigError) as info:
        load(path, missing_default)
    message = str(info.value)
    assert "sources.nvml.interval_s" in message
    assert "WATTMETER" in message
    assert str(path) not in message


def test_bad_env_value_without_a_file(missing_default: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTMETER_PROMETHEUS__LISTEN", "nohost")
    with pytest.raises(ConfigError) as info:
        load(None, missing_default)
    assert "prometheus.listen" in str(info.value)
    assert "WATTMETER" in str(info.value)


def test_bad_cli_override_is_a_config_error(missing_default: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, missing_default, {"prometheus": {"listen": "badvalue"}})
    assert "prometheus.listen" in str(info.value)
    assert "badvalue" in str(info.value)


def test_wattmeter_config_env_var_is_not_an_unknown_key(
    tmp_path: Path, missing_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'log_level = "debug"\n')
    monkeypatch.setenv("WATTMETER_CONFIG", str(path))
    assert load(path, missing_default).log_level == "debug"


# --- errors -----------------------------------------------------------------------------------------------


def config_error(tmp_path: Path, missing_default: Path, text: str) -> tuple[Path, str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, missing_default)
    return path, str(info.value)


@pytest.mark.parametrize(
    ("text", "dotted"),
    [
        ("lgo_level = 'debug'\n", "lgo_level"),
        ("[prometheus]\nlisten_addr = ':1'\n", "prometheus.listen_addr"),
        ("[sources.nvml]\nintervl_s = 0.2\n", "sources.nvml.intervl_s"),
        ("[sources.gpu]\nenabled = true\n", "sources.gpu"),
        (
            "[prometheus.basic_auth]\nusername = 'u'\npassword_hash = '{h}'\nrealm = 'x'\n",
            "prometheus.basic_auth.realm",
        ),
    ],
)
def test_unknown_key_is_an_error_naming_the_dotted_key(
    tmp_path: Path, missing_default: Path, text: str, dotted: str
) -> None:
    path, message = config_error(tmp_path, missing_default, text.replace("{h}", SHA256_HASH))
    assert f"{path}: {dotted}: unknown key" in message


@pytest.mark.parametrize(
    ("text", "dotted"),
    [
        ("[sources.nvml]\ninterval_s = -0.1\n", "sources.nvml.interval_s"),
        ("[sources.nvml]\ninterval_s = 0\n", "sources.nvml.interval_s"),
        ("[sources.rapl]\ninterval_s = -1\n", "sources.rapl.interval_s"),
        ("[sources.cpu_model]\ninterval_s = -5\n", "sources.cpu_model.interval_s"),
        ("[sampler]\nread_timeout_s = -2\n", "sampler.read_timeout_s"),
        ("[sources.simulated]\ngpus = -1\n", "sources.simulated.gpus"),
        ("[prometheus]\nlisten = 'nohost'\n", "prometheus.listen"),
        ("[prometheus]\nlisten = 'localhost:99999'\n", "prometheus.listen"),
        ("[prometheus]\nlisten = 'localhost:http'\n", "prometheus.listen"),
        ("log_level = 'verbose'\n", "log_level"),
        ("[sources.nvml]\nenabled = 'yes please'\n", "sources.nvml.enabled"),
        ("[sources.simulated]\ngpus = 'two'\n", "sources.simulated.gpus"),
    ],
)
def test_bad_value_names_the_key_and_the_file(tmp_path: Path, missing_default: Path, text: str, dotted: str) -> None:
    path, message = config_error(tmp_path, missing_default, text)
    assert f"{path}: {dotted}:" in message


def test_bad_listen_message_says_what_is_wrong(tmp_path: Path, missing_default: Path) -> None:
    _, message = config_error(tmp_path, missing_default, "[prometheus]\nlisten = 'nohost'\n")
    assert "'nohost'" in message
    assert "host:port" in message
    _, message = config_error(tmp_path, missing_default, "[prometheus]\nlisten = '0.0.0.0:99999'\n")
    assert "99999" in message
    assert "65535" in message


def test_tls_cert_without_key(tmp_path: Path, missing_default: Path) -> None:
    path, message = config_error(tmp_path, missing_default, "[prometheus]\ntls_cert = '/etc/cert.pem'\n")
    assert f"{path}: prometheus:" in message
    assert "tls_cert and tls_key must be set together" in message


def test_tls_key_without_cert(tmp_path: Path, missing_default: Path) -> None:
    path, message = config_error(tmp_path, missing_default, "[prometheus]\ntls_key = '/etc/key.pem'\n")
    assert f"{path}: prometheus:" in message
    assert "tls_cert and tls_key" in message


@pytest.mark.parametrize(
    "bad_hash",
    [
        "hunter2",  # a plain password
        "sha256:abc",  # too short
        "sha256:" + "g" * 64,  # not hex
        "sha256:" + "a" * 65,  # too long
        "md5:" + "a" * 32,
        "sha256:0x" + "a" * 62,  # int(..., 16) accepts a 0x prefix; 64 hex digits were asked for
        "sha256: " + "a" * 63,  # int() strips whitespace
        "sha256:+" + "a" * 63,  # int() accepts a sign
        "sha256:" + "a" * 32 + "_" + "a" * 31,  # int() accepts underscores
        "$2b$not-a-bcrypt-hash",  # bcrypt.checkpw raises "Invalid salt" on every scrape
    ],
)
def test_bad_password_hash_names_the_key_and_the_file(tmp_path: Path, missing_default: Path, bad_hash: str) -> None:
    text = f"[prometheus.basic_auth]\nusername = 'scraper'\npassword_hash = '{bad_hash}'\n"
    path, message = config_error(tmp_path, missing_default, text)
    assert f"{path}: prometheus.basic_auth.password_hash:" in message
    assert "wattmeter hash-password" in message


@pytest.mark.parametrize(
    "good_hash",
    [
        SHA256_HASH,
        SHA256_HASH.upper().replace("SHA256:", "sha256:"),
        "$2b$12$" + "a" * 53,
    ],
)
def test_good_password_hashes_are_accepted(good_hash: str) -> None:
    assert BasicAuthConfig(username="u", password_hash=good_hash).password_hash == good_hash


def test_basic_auth_needs_both_fields(tmp_path: Path, missing_default: Path) -> None:
    path, message = config_error(tmp_path, missing_default, "[prometheus.basic_auth]\nusername = 'u'\n")
    assert f"{path}: prometheus.basic_auth.password_hash:" in message


def test_every_error_is_reported_on_its_own_line(tmp_path: Path, missing_default: Path) -> None:
    text = "lgo_level = 'debug'\n[sources.nvml]\ninterval_s = 'fast'\n[prometheus]\nlisten = 'nohost'\n"
    path, message = config_error(tmp_path, missing_default, text)
    lines = message.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert any(": lgo_level: unknown key" in line for line in lines)
    assert any(": sources.nvml.interval_s:" in line and "'fast'" in line for line in lines)
    assert any(": prometheus.listen:" in line for line in lines)


def test_malformed_toml_names_the_file(tmp_path: Path, missing_default: Path) -> None:
    path, message = config_error(tmp_path, missing_default, "[prometheus\nlisten = \n")
    assert message.startswith(f"{path}: not valid TOML")


def test_missing_file(tmp_path: Path, missing_default: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(path, missing_default)
    assert str(path) in str(info.value)
    assert "no such file" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path, missing_default: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, missing_default)
    assert str(tmp_path) in str(info.value)
    assert "directory" in str(info.value)


# --- cpu_model.enabled ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("literal", "expected"), [('"auto"', "auto"), ("true", True), ("false", False)])
def test_cpu_model_enabled_accepts_auto_true_false(
    tmp_path: Path, missing_default: Path, literal: str, expected: object
) -> None:
    config = load(write(tmp_path, f"[sources.cpu_model]\nenabled = {literal}\n"), missing_default)
    assert config.sources.cpu_model.enabled == expected
    assert type(config.sources.cpu_model.enabled) is type(expected)


def test_cpu_model_enabled_refuses_maybe(tmp_path: Path, missing_default: Path) -> None:
    path, message = config_error(tmp_path, missing_default, '[sources.cpu_model]\nenabled = "maybe"\n')
    assert f"{path}: sources.cpu_model.enabled" in message
    assert "'maybe'" in message


# --- parse_listen -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:9750", ("0.0.0.0", 9750)),
        ("[::1]:9750", ("::1", 9750)),
        ("[::]:9750", ("::", 9750)),
        (":9750", ("0.0.0.0", 9750)),
        ("localhost:80", ("localhost", 80)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("host.example:65535", ("host.example", 65535)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["nohost", "localhost:", "localhost:http", "host:-1", "host:65536", "", "[::1]"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_prometheus_config_accepts_port_zero() -> None:
    assert PrometheusConfig(listen="127.0.0.1:0").listen == "127.0.0.1:0"


# --- tomlwrite round trip ---------------------------------------------------------------------------------


def round_trip(config: AgentConfig) -> AgentConfig:
    text = tomlwrite.dumps(config.model_dump(mode="json"))
    return AgentConfig.model_validate(tomllib.loads(text))


def test_tomlwrite_round_trips_defaults(missing_default: Path) -> None:
    config = load(None, missing_default)
    assert round_trip(config) == config


def test_tomlwrite_round_trips_a_full_config(tmp_path: Path, missing_default: Path) -> None:
    config = load(write(tmp_path, FULL_FILE), missing_default)
    assert round_trip(config) == config


def test_tomlwrite_round_trips_workload_rules(missing_default: Path) -> None:
    rules = [
        {"match_cmdline": r"my_trainer\.py --cfg \S+", "workload": "llama-70b-ft", "phase": "training", "job": "7"},
        {"match_cmdline": "serve", "phase": "inference"},
    ]
    config = load(None, missing_default, {"workloads": {"rules": rules}})
    assert round_trip(config) == config
    assert len(round_trip(config).workloads.rules) == 2


@pytest.mark.parametrize("enabled", ["auto", True, False])
def test_tomlwrite_round_trips_cpu_model_enabled(missing_default: Path, enabled: object) -> None:
    config = load(None, missing_default, {"sources": {"cpu_model": {"enabled": enabled}}})
    assert round_trip(config).sources.cpu_model.enabled == enabled


def test_tomlwrite_round_trips_awkward_strings(missing_default: Path) -> None:
    overrides = {
        "sources": {
            "nvml": {"library_path": 'C:\\odd "path"\twith tab/ünïcode/\u2603'},
            "rapl": {"root": "/sys/class/powercap with space"},
        },
        "prometheus": {"basic_auth": {"username": 'it\'s "me"\n', "password_hash": SHA256_HASH}},
    }
    config = load(None, missing_default, overrides)
    assert round_trip(config) == config


def test_tomlwrite_output_is_plain_toml(missing_default: Path) -> None:
    config = load(None, missing_default, {"sources": {"simulated": {"gpus": 2}}})
    text = tomlwrite.dumps(config.model_dump(mode="json"))
    data = tomllib.loads(text)
    assert data["sources"]["simulated"]["gpus"] == 2
    assert data["prometheus"]["listen"] == "0.0.0.0:9750"
    assert "tls_cert" not in data["prometheus"]  # None is left out
    assert text.endswith("\n")


def test_tomlwrite_scalars() -> None:
    data = {"b": True, "i": -3, "f": 0.1, "s": "x", "l": [1, 2.5, "y", False], "t": {"n": None, "k": 1}}
    text = tomlwrite.dumps(data)
    assert tomllib.loads(text) == {"b": True, "i": -3, "f": 0.1, "s": "x", "l": [1, 2.5, "y", False], "t": {"k": 1}}


def test_an_env_var_that_is_not_a_table_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTMETER_PROMETHEUS", "foo")
    with pytest.raises(ConfigError, match="WATTMETER_PROMETHEUS__LISTEN"):
        load_config(None, default_path=tmp_path / "none.toml")


# --- [stream] ---------------------------------------------------------------------------------------------------

STREAM_FILE = """
[stream]
target = "aggregator.example.com:9751"
batch_interval_s = 2.0
max_batch_bytes = 1048576
spool_dir = "/data/wattmeter/spool"
spool_max_bytes = 268435456
fsync = "interval"
compression = "gzip"
keepalive_s = 20.0
ack_timeout_s = 15.0
reconnect_min_s = 1.0
reconnect_max_s = 60.0
ca_file = "/etc/wattmeter/ca.crt"
cert_file = "/etc/wattmeter/host.crt"
key_file = "/etc/wattmeter/host.key"
server_name = "aggregator.internal"
token_file = "/etc/wattmeter/token"
hostname = "gpu-node-17"
"""


def test_stream_is_off_by_default(missing_default: Path) -> None:
    stream = load(None, missing_default).stream
    assert stream.target == "" and not stream.enabled
    assert (stream.batch_interval_s, stream.max_batch_bytes) == (1.0, 4 * 1024 * 1024)
    assert (stream.spool_dir, stream.spool_max_bytes) == (Path("/var/lib/wattmeter/spool"), 1024**3)
    assert (stream.fsync, stream.compression) == ("always", "none")
    assert (stream.keepalive_s, stream.ack_timeout_s) == (30.0, 30.0)
    assert (stream.reconnect_min_s, stream.reconnect_max_s) == (0.5, 30.0)
    assert stream.insecure is False
    assert (stream.ca_file, stream.cert_file, stream.key_file, stream.server_name, stream.token_file) == (None,) * 5
    assert stream.hostname == ""


def test_stream_loads_every_key_and_round_trips(tmp_path: Path, missing_default: Path) -> None:
    config = load(write(tmp_path, STREAM_FILE), missing_default)
    stream = config.stream
    assert stream.enabled and stream.uses_tls
    assert stream.target == "aggregator.example.com:9751"
    assert (stream.batch_interval_s, stream.max_batch_bytes, stream.spool_max_bytes) == (2.0, 1048576, 268435456)
    assert (stream.fsync, stream.compression, stream.keepalive_s, stream.ack_timeout_s) == ("interval", "gzip", 20, 15)
    assert (stream.cert_file, stream.key_file) == (Path("/etc/wattmeter/host.crt"), Path("/etc/wattmeter/host.key"))
    assert (stream.server_name, stream.hostname) == ("aggregator.internal", "gpu-node-17")
    assert round_trip(config) == config


def test_stream_env_override(missing_default: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATTMETER_STREAM__TARGET", "10.0.0.5:9751")
    monkeypatch.setenv("WATTMETER_STREAM__INSECURE", "true")
    stream = load(None, missing_default).stream
    assert stream.target == "10.0.0.5:9751" and not stream.uses_tls


@pytest.mark.parametrize(
    ("target", "extra", "tls"),
    [
        ("aggregator:9751", {}, True),  # off the host: TLS with the system roots
        ("10.1.2.3:9751", {"insecure": True}, False),
        ("127.0.0.1:9751", {}, False),  # loopback: plain text is fine
        ("127.8.9.10:9751", {}, False),
        ("localhost:9751", {}, False),
        ("[::1]:9751", {}, False),
        ("localhost:9751", {"ca_file": "/ca.pem"}, True),  # asked for: TLS even on loopback
        ("[2001:db8::1]:9751", {}, True),
    ],
)
def test_stream_plain_text_only_to_loopback_or_when_insecure(target: str, extra: dict[str, object], tls: bool) -> None:
    assert StreamConfig.model_validate({"target": target, **extra}).uses_tls is tls


@pytest.mark.parametrize(
    ("text", "dotted", "words"),
    [
        ("target = 'aggregator'", "stream.target", "host:port"),
        ("target = ':9751'", "stream.target", "has no host"),
        ("target = 'aggregator:0'", "stream.target", "port 0"),
        ("target = 'aggregator:99999'", "stream.target", "outside 0-65535"),
        ("batch_interval_s = 0", "stream.batch_interval_s", "greater than 0"),
        ("max_batch_bytes = 1000", "stream.max_batch_bytes", "greater than or equal to 65536"),
        ("spool_max_bytes = 1000", "stream.spool_max_bytes", "greater than or equal to"),
        ("fsync = 'sometimes'", "stream.fsync", "'always', 'interval' or 'never'"),
        ("compression = 'zstd'", "stream.compression", "'none' or 'gzip'"),
        ("ack_timeout_s = -1", "stream.ack_timeout_s", "greater than 0"),
        ("reconnect_min_s = 10\nreconnect_max_s = 5", "stream", "reconnect_min_s (10) is above reconnect_max_s (5)"),
        ("cert_file = '/c.pem'", "stream", "cert_file and key_file must be set together"),
        ("insecure = true\nca_file = '/ca.pem'", "stream", "insecure = true sends plain text: remove ca_file"),
        ("tagret = 'a:1'", "stream.tagret", "unknown key"),
    ],
)
def test_stream_config_errors_name_the_key_and_why(
    tmp_path: Path, missing_default: Path, text: str, dotted: str, words: str
) -> None:
    path, message = config_error(tmp_path, missing_default, f"[stream]\n{text}\n")
    assert f"{path}: {dotted}:" in message
    assert words in message
