"""The gRPC channel to the aggregator: TLS or plain text, client certificate, bearer token, keepalive, backoff."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import grpc

from collector import __version__
from collector.config import StreamConfig
from collector.errors import ConfigError

# Sends are bounded by [stream] max_batch_bytes when the batch is built; a spooled batch from an agent that ran
# with a larger limit must still go out, so the channel allows the largest limit the config accepts, and more.
MAX_SEND_MESSAGE_BYTES = 80 * 1024 * 1024
MAX_RECEIVE_MESSAGE_BYTES = 1024 * 1024  # acks are tiny
KEEPALIVE_TIMEOUT_S = 10.0
STREAM_METHOD = "/wattmeter.v1.Telemetry/Stream"


def _read_file(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"[stream] {key}: cannot read {path}: {exc.strerror or exc} (fix the path or make it readable by the agent)"
        ) from None


@dataclass(frozen=True)
class ChannelSettings:
    """What every connection needs, read once at start so a bad path is a start-up error, not a silent retry."""

    target: str
    tls: bool
    root_certificates: bytes | None
    certificate_chain: bytes | None
    private_key: bytes | None
    options: tuple[tuple[str, str | int], ...]
    compression: grpc.Compression
    token_file: Path | None

    @classmethod
    def from_config(cls, config: StreamConfig) -> ChannelSettings:
        options: list[tuple[str, str | int]] = [
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(min(KEEPALIVE_TIMEOUT_S, config.keepalive_s) * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            ("grpc.primary_user_agent", f"wattmeter-agent/{__version__}"),
            # reconnects are ours (backoff with jitter, a fresh channel each time): no transparent retries under them
            ("grpc.enable_retries", 0),
        ]
        if config.server_name:
            options.append(("grpc.ssl_target_name_override", config.server_name))
        settings = cls(
            target=config.target,
            tls=config.uses_tls,
            root_certificates=_read_file("ca_file", config.ca_file) if config.ca_file else None,
            certificate_chain=_read_file("cert_file", config.cert_file) if config.cert_file else None,
            private_key=_read_file("key_file", config.key_file) if config.key_file else None,
            options=tuple(options),
            compression=grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression,
            token_file=config.token_file,
        )
        settings.metadata()  # an unreadable or empty token file is a start-up error
        return settings

    def channel(self) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(self.target, options=self.options)
        credentials = grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)
        return grpc.secure_channel(self.target, credentials, options=self.options)

    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """Call metadata: the bearer token, read afresh at each connection so a rotated token is picked up."""
        if self.token_file is None:
            return ()
        token = _read_file("token_file", self.token_file).decode("utf-8", errors="replace").strip()
        if not token:
            raise ConfigError(f"[stream] token_file: {self.token_file} is empty (put the agent's token in it)")
        return (("authorization", f"Bearer {token}"),)


def backoff_s(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds before reconnect ``attempt`` (0, 1, 2...): full jitter over [min_s, min(max_s, min_s * 2**attempt)],
    so a fleet that lost its aggregator does not come back in lockstep."""
    ceiling = min(max_s, min_s * 2.0 ** min(attempt, 64))
    return rng.uniform(min_s, ceiling)
