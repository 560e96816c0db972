"""The agent's configuration: one pydantic model tree fed by the TOML file, ``WATTMETER_*`` env vars and the CLI.

Precedence, highest first: CLI flags, environment (``WATTMETER_SOURCES__NVML__INTERVAL_S=0.2``), the file,
built-in defaults. Unknown keys in the file are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from collector.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/wattmeter/agent.toml")


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


class BasicAuthConfig(_Section):
    username: str = Field(min_length=1)
    password_hash: str = Field(
        min_length=1,
        description="bcrypt ($2b$...) or sha256 hex digest ('sha256:<hex>') of the password; never the password",
    )

    @field_validator("password_hash")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value.startswith(("$2a$", "$2b$", "$2y$")):
            return value
        if value.startswith("sha256:") and len(value) == 71:
            try:
                int(value[7:], 16)
            except ValueError:
                pass
            else:
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
    cpu: bool = Field(True, description="also simulate one CPU package when gpus > 0")


class SourcesConfig(_Section):
    nvml: NvmlConfig = NvmlConfig()
    rapl: RaplConfig = RaplConfig()
    cpu_model: CpuModelConfig = CpuModelConfig()
    simulated: SimulatedConfig = SimulatedConfig()


class SamplerConfig(_Section):
    read_timeout_s: float = Field(2.0, gt=0, le=60, description="a read longer than this marks its source down")


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WATTMETER_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    prometheus: PrometheusConfig = PrometheusConfig()
    sources: SourcesConfig = SourcesConfig()
    sampler: SamplerConfig = SamplerConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # File values travel in as init kwargs below the CLI's; env sits between them (see load_config).
        return (init_settings, env_settings)


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


def format_validation_error(exc: ValidationError, origin: str) -> list[str]:
    """One line per error: the dotted key, what was wrong, and the value given."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see deploy/agent.example.toml for every key)"
        given = error.get("input")
        shown = "" if error["type"] in ("extra_forbidden", "missing") else f" (got {given!r})"
        lines.append(f"{origin}: {key}: {message}{shown}")
    return lines


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    default_path: Path = DEFAULT_CONFIG_PATH,
) -> AgentConfig:
    """Build the effective config. ``path`` None means ``default_path`` if it exists, else built-in defaults."""
    if path is None and default_path.exists():
        path = default_path
    file_data = read_toml(path) if path is not None else {}
    origin = str(path) if path is not None else "config"
    try:
        # Validate the file on its own first so its errors name the file, then layer env and CLI on top.
        AgentConfig.model_validate(file_data)
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(exc, origin))) from None
    try:
        env_data = AgentConfig().model_dump(exclude_unset=True)  # only the keys WATTMETER_* vars set
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(exc, "WATTMETER_* environment"))) from None
    try:
        return AgentConfig(**deep_merge(deep_merge(file_data, env_data), overrides or {}))
    except ValidationError as exc:
        raise ConfigError("\n".join(format_validation_error(exc, "command line"))) from None


def env_config_path() -> Path | None:
    value = os.environ.get("WATTMETER_CONFIG")
    return Path(value) if value else None
