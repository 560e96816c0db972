"""The aggregator's configuration (``/etc/wattmeter/aggregator.toml``), loaded like the agent's (file, then
``WATTMETER_*`` variables, then the command line; unknown keys are errors)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from collector.carbon.config import CarbonConfig
from collector.config import PrometheusConfig, is_loopback, load_model, parse_listen
from collector.store import urls
from collector.store.base import StoreError

DEFAULT_AGGREGATOR_CONFIG_PATH = Path("/etc/wattmeter/aggregator.toml")
AGGREGATOR_EXAMPLE = "deploy/aggregator.example.toml"
TOKEN_HASH = re.compile(r"sha256:[0-9a-fA-F]{64}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str) -> float:
    """``"90s"``, ``"5m"``, ``"1h"``, ``"400d"`` to seconds."""
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a duration: a number and a unit, s m h or d (for example 90s, 1h, 400d)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GrpcConfig(_Section):
    listen: str = "0.0.0.0:9751"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = Field(
        None, description="set: mTLS; client certs must chain to it and their CN/SAN DNS names are the host identity"
    )
    agent_tokens: dict[str, str] = Field(
        default_factory=dict, description="hostname = 'sha256:<hex>' of the agent's bearer token"
    )
    insecure: bool = Field(False, description="allow plain text on a non-loopback address")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("agent_tokens")
    @classmethod
    def _token_hashes(cls, value: dict[str, str]) -> dict[str, str]:
        for hostname, token_hash in value.items():
            if not hostname:
                raise ValueError("a hostname is empty")
            if not TOKEN_HASH.fullmatch(token_hash):
                raise ValueError(
                    f"{hostname}: must be 'sha256:' followed by 64 hex digits, never the token itself; "
                    "make one with: wattmeter hash-password --scheme sha256 (the token on stdin)"
                )
        return value

    @model_validator(mode="after")
    def _transport(self) -> GrpcConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca (mTLS) needs tls_cert and tls_key too")
        host, _ = parse_listen(self.listen)
        if self.tls_cert is None and not self.insecure and not is_loopback(host):
            raise ValueError(
                f"listen = {self.listen!r} without TLS would send telemetry and tokens in clear: set tls_cert and "
                "tls_key (and client_ca for mTLS), or insecure = true on a trusted network, or listen on 127.0.0.1"
            )
        return self


class HttpConfig(PrometheusConfig):
    """``[http]``: the JSON API, ``/metrics`` and ``/healthz``; TLS and basic auth as the agent's ``[prometheus]``."""

    listen: str = "0.0.0.0:9752"


class StorageConfig(_Section):
    url: str = Field("sqlite:////var/lib/wattmeter/aggregator.db", description="sqlite:///PATH or postgresql://...")
    raw_retention: str = "1h"
    rollup_retention: str = "400d"
    prune_interval: str = "5m"

    @field_validator("raw_retention", "rollup_retention", "prune_interval")
    @classmethod
    def _duration(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError("must be more than 0")
        return value

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        try:
            if urls.scheme(value) == "sqlite":
                urls.sqlite_path(value)
        except StoreError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def raw_retention_s(self) -> float:
        return parse_duration(self.raw_retention)

    @property
    def rollup_retention_s(self) -> float:
        return parse_duration(self.rollup_retention)

    @property
    def prune_interval_s(self) -> float:
        return parse_duration(self.prune_interval)


class IngestConfig(_Section):
    max_future_s: float = Field(300.0, ge=0, description="samples later than now + this are refused (clock skew)")
    max_batch_samples: int = Field(1_000_000, ge=1, description="device + workload samples in one batch")
    workers: int = Field(
        1,
        ge=0,
        le=64,
        description="worker processes that parse and check batches beside the aggregator; 0: its event loop does",
    )


class RequestsConfig(_Section):
    """``[requests]``: energy per request (``collector.aggregator.request_engine``)."""

    interval_s: float = Field(1.0, gt=0, le=3600, description="how often pending requests are attributed")
    finalize_grace_s: float = Field(
        30.0, ge=0, le=86_400, description="past a request's end, it is computed with what there is (approximate)"
    )
    weight: Literal["equal", "tokens"] = Field(
        "equal", description="split a workload's energy among its running requests equally, or by tokens"
    )
    pue: float = Field(1.0, ge=1.0, le=10.0, description="power usage effectiveness applied to the full view")
    max_per_pass: int = Field(20_000, ge=1, le=1_000_000, description="pending requests taken per pass")
    max_label_values: int = Field(
        100, ge=1, le=10_000, description="distinct model (and tenant) label values on /metrics; the rest: other"
    )


class AggregatorConfig(_Section):
    """The whole aggregator configuration. Validating it reads nothing from the environment: see ``load``."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # validated even when absent: the default listen address is not loopback, so it needs TLS or insecure = true
    grpc: GrpcConfig = Field(default_factory=dict, validate_default=True)
    http: HttpConfig = HttpConfig()
    storage: StorageConfig = StorageConfig()
    ingest: IngestConfig = IngestConfig()
    requests: RequestsConfig = RequestsConfig()
    carbon: CarbonConfig | None = Field(None, description="[carbon]: intensity and price; absent: no CO2/cost metrics")


def load_aggregator_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    default_path: Path = DEFAULT_AGGREGATOR_CONFIG_PATH,
    environ: Mapping[str, str] | None = None,
) -> AggregatorConfig:
    return load_model(
        AggregatorConfig, path, overrides, default_path=default_path, environ=environ, example=AGGREGATOR_EXAMPLE
    )
