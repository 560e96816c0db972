"""The agent's configuration: one pydantic model tree fed by the TOML file, ``WATTMETER_*`` env vars and the CLI.

Precedence, highest first: CLI flags, environment (``WATTMETER_SOURCES__NVML__INTERVAL_S=0.2``), the file,
built-in defaults. Unknown keys in the file are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from collector.carbon.config import CarbonConfig
from collector.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/wattmeter/agent.toml")
AGENT_EXAMPLE = "deploy/agent.example.toml"
ENV_PREFIX = "WATTMETER_"
_BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_SHA256_HASH = re.compile(r"sha256:[0-9a-fA-F]{64}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:9750``, ``:9750`` for all interfaces) into host and port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{value!r} is not host:port (for example 0.0.0.0:9750 or [::]:9750)")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


def parse_target(value: str) -> tuple[str, int]:
    """Split a gRPC target ``host:port`` (``[::1]:9751`` for IPv6) into host and port; the host is required."""
    host, port = parse_listen(value)
    if not value.rpartition(":")[0]:
        raise ValueError(f"{value!r} has no host (for example aggregator.example.com:9751)")
    if port == 0:
        raise ValueError(f"{value!r}: port 0 is not a port to connect to (the aggregator listens on 9751)")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine: ``localhost``, 127.0.0.0/8 or ::1 (plain text cannot leave the host)."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BasicAuthConfig(_Section):
    username: str = Field(min_length=1)
    password_hash: str = Field(
        min_length=1,
        description="bcrypt ($2b$...) or sha256 hex digest ('sha256:<hex>') of the password; never the password",
    )

    @field_validator("password_hash")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if _BCRYPT_HASH.fullmatch(value) or _SHA256_HASH.fullmatch(value):
            return value
        raise ValueError(
            "must be a bcrypt hash ($2b$...) or 'sha256:' followed by 64 hex digits; "
            "make one with: wattmeter hash-password"
        )


class PrometheusConfig(_Section):
    listen: str = "0.0.0.0:9750"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    basic_auth: BasicAuthConfig | None = None

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> PrometheusConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self


class NvmlConfig(_Section):
    enabled: bool = True
    interval_s: float = Field(0.1, gt=0, le=60)
    slow_interval_s: float = Field(1.0, gt=0, le=600)
    library_path: str | None = Field(None, description="libnvidia-ml.so path; default: the dynamic loader's")


class RaplConfig(_Section):
    enabled: bool = True
    root: Path = Path("/sys/class/powercap")
    interval_s: float = Field(0.1, gt=0, le=60)


class CpuModelConfig(_Section):
    enabled: bool | Literal["auto"] = "auto"
    watts_per_core: float = Field(10.0, ge=0, le=1000)
    idle_watts: float = Field(50.0, ge=0, le=10000)
    interval_s: float = Field(1.0, gt=0, le=60)


class SimulatedConfig(_Section):
    gpus: int = Field(0, ge=0, le=64)
    interval_s: float = Field(0.1, gt=0, le=60)
    seed: int = 0
    cpu: bool = Field(False, description="also simulate one CPU package (never beside a readable RAPL)")


class SourcesConfig(_Section):
    nvml: NvmlConfig = NvmlConfig()
    rapl: RaplConfig = RaplConfig()
    cpu_model: CpuModelConfig = CpuModelConfig()
    simulated: SimulatedConfig = SimulatedConfig()


Phase = Literal["training", "inference", "unknown"]


class WorkloadRule(_Section):
    """``[[workloads.rules]]``: a process whose command line matches ``match_cmdline`` is this workload."""

    match_cmdline: str = Field(min_length=1, description="Python regular expression, searched in the command line")
    workload: str | None = Field(None, description="default: the executable name")
    phase: Phase | None = None
    job: str | None = None

    @field_validator("match_cmdline")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class WorkloadsConfig(_Section):
    enabled: bool = True
    interval_s: float = Field(1.0, gt=0, le=60, description="process scans; shares hold until the next scan")
    proc_root: Path = Path("/proc")
    max_series: int = Field(500, ge=1, le=100_000, description="beyond it the smallest fold into workload=other")
    retain_s: float = Field(600.0, ge=0, description="ended workloads stay exported this long")
    rules: list[WorkloadRule] = []


class ApiConfig(_Section):
    socket: Path = Path("/run/wattmeter/agent.sock")
    socket_mode: int = Field(0o660, ge=0, le=0o777)
    max_message_bytes: int = Field(65536, ge=256, le=16 * 1024 * 1024)
    max_messages_per_s: float = Field(1000.0, gt=0, description="per connection; past it messages are dropped")


class SamplerConfig(_Section):
    read_timeout_s: float = Field(2.0, gt=0, le=60, description="a read longer than this marks its source down")


class StreamConfig(_Section):
    """``[stream]``: batches of readings sent over gRPC to ``wattmeter aggregator``, spooled on disk until acked."""

    target: str = Field("", description='aggregator host:port; "" turns streaming off')
    batch_interval_s: float = Field(1.0, gt=0, le=60)
    max_batch_bytes: int = Field(4 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024, description="cut a batch early")
    spool_dir: Path = Path("/var/lib/wattmeter/spool")
    spool_max_bytes: int = Field(1024**3, ge=16 * 1024 * 1024, description="past it the oldest batches are dropped")
    fsync: Literal["always", "interval", "never"] = "always"
    compression: Literal["none", "gzip"] = "none"
    keepalive_s: float = Field(30.0, ge=1, le=3600)
    ack_timeout_s: float = Field(30.0, gt=0, le=3600, description="no ack this long with batches out: reconnect")
    reconnect_min_s: float = Field(0.5, gt=0, le=3600)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    insecure: bool = Field(False, description="plain text to a target that is not loopback")
    ca_file: Path | None = Field(None, description="CA bundle for the aggregator's cert; default: system roots")
    cert_file: Path | None = Field(None, description="client certificate (mTLS)")
    key_file: Path | None = None
    server_name: str | None = Field(None, description="name to verify the aggregator's cert against")
    token_file: Path | None = Field(None, description="bearer token sent as `authorization: Bearer <token>`")
    hostname: str = Field("", description="host name in batches; default: socket.gethostname()")

    @field_validator("target")
    @classmethod
    def _valid_target(cls, value: str) -> str:
        if value:
            parse_target(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StreamConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s:g}) is above reconnect_max_s ({self.reconnect_max_s:g})"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together (the client certificate and its key)")
        if self.insecure and (self.ca_file or self.cert_file or self.server_name):
            raise ValueError(
                "insecure = true sends plain text: remove ca_file, cert_file/key_file and server_name, "
                "or set insecure = false"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.target)

    @property
    def uses_tls(self) -> bool:
        """TLS unless ``insecure``; to a loopback target only when a CA, client cert or server name is given."""
        if self.insecure:
            return False
        if self.target and not is_loopback(parse_target(self.target)[0]):
            return True
        return bool(self.ca_file or self.cert_file or self.server_name)


class AgentConfig(_Section):
    """The whole agent configuration. Validating it reads nothing from the environment: see ``load_config``."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    prometheus: PrometheusConfig = PrometheusConfig()
    sources: SourcesConfig = SourcesConfig()
    sampler: SamplerConfig = SamplerConfig()
    workloads: WorkloadsConfig = WorkloadsConfig()
    api: ApiConfig = ApiConfig()
    stream: StreamConfig = StreamConfig()
    carbon: CarbonConfig | None = Field(None, description="[carbon]: intensity and price; absent: no CO2/cost metrics")


ModelT = TypeVar("ModelT", bound=BaseModel)


@functools.cache
def _environment_class(model: type[BaseModel]) -> type[BaseSettings]:
    """``model`` as settings, only used to collect ``WATTMETER_*`` variables into a raw nested dict (validated
    with the rest, by ``model`` itself)."""
    settings = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore")
    return cast(
        type[BaseSettings], type(f"_{model.__name__}Environment", (model, BaseSettings), {"model_config": settings})
    )


def environment_overrides(
    environ: Mapping[str, str] | None = None, model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """The raw values that ``WATTMETER_<SECTION>__<KEY>`` variables set for ``model`` (default: the agent's),
    nested like the file."""
    source = EnvSettingsSource(_environment_class(model or AgentConfig))
    if environ is not None:
        source.env_vars = {key.lower(): value for key, value in environ.items()}
    try:
        return dict(source())
    except SettingsError as exc:  # e.g. WATTMETER_PROMETHEUS=foo, where a table is expected
        raise ConfigError(
            f"environment: {exc}; set single keys as {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}PROMETHEUS__LISTEN"
        ) from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
            return data
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (pass --config PATH, or create it)") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied (make it readable by the agent's user)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _has_path(data: Mapping[str, Any], loc: tuple[Any, ...]) -> bool:
    node: Any = data
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def format_validation_error(
    exc: ValidationError,
    origin: str,
    env: Mapping[str, Any] | None = None,
    cli: Mapping[str, Any] | None = None,
    example: str = AGENT_EXAMPLE,
) -> list[str]:
    """One line per error: where the value came from, the dotted key, what was wrong, and the value given.

    A key set by the command line or a ``WATTMETER_*`` variable is blamed on that, not on the file.
    """
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        where = origin
        if cli and _has_path(cli, loc):
            where = "command line"
        elif env and _has_path(env, loc):
            where = f"environment {ENV_PREFIX}{'__'.join(str(p) for p in loc).upper()}"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown key (check the spelling; see {example} for every key)"
        given = error.get("input")
        shown = (
            "" if error["type"] in ("extra_forbidden", "missing") or isinstance(given, Mapping) else f" (got {given!r})"
        )
        lines.append(f"{where}: {key}: {message}{shown}")
    return lines


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    default_path: Path = DEFAULT_CONFIG_PATH,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Build the agent's effective config: see ``load_model``."""
    return load_model(AgentConfig, path, overrides, default_path=default_path, environ=environ)


def load_model(
    model: type[ModelT],
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    default_path: Path,
    environ: Mapping[str, str] | None = None,
    example: str = AGENT_EXAMPLE,
) -> ModelT:
    """Build an effective config of ``model``: the file (``path``; None means ``default_path`` if it exists, else
    none), then ``WATTMETER_*`` variables, then ``overrides`` (the CLI's), validated together so that one key of a
    pair (a TLS key, a password hash) can be overridden alone.
    """
    if path is None and default_path.exists():
        path = default_path
    file_data = read_toml(path) if path is not None else {}
    env_data = environment_overrides(environ, model)
    cli_data = dict(overrides or {})
    try:
        return model.model_validate(deep_merge(deep_merge(file_data, env_data), cli_data))
    except ValidationError as exc:
        origin = str(path) if path is not None else "defaults"
        raise ConfigError("\n".join(format_validation_error(exc, origin, env_data, cli_data, example))) from None


def check_file(path: Path, model: type[BaseModel] | None = None, example: str = AGENT_EXAMPLE) -> list[str]:
    """Errors in one config file of ``model`` (default: the agent's) on its own (no environment, no CLI): one line
    each; empty when it is valid."""
    try:
        config = (model or AgentConfig).model_validate(read_toml(path))
    except ConfigError as exc:
        return str(exc).splitlines()
    except ValidationError as exc:
        return format_validation_error(exc, str(path), example=example)
    carbon = getattr(config, "carbon", None)
    if isinstance(carbon, CarbonConfig) and carbon.csv is not None:
        from collector.carbon.series import CarbonSeriesSource

        try:  # the CSV's rows, read and checked as the agent and the aggregator do at start
            CarbonSeriesSource(carbon)
        except ConfigError as exc:
            return [f"{path}: [carbon] csv: {line}" for line in str(exc).splitlines()]
    return []


def env_config_path() -> Path | None:
    value = os.environ.get("WATTMETER_CONFIG")
    return Path(value) if value else None
