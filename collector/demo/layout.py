"""Where the demo keeps its things (one directory) and the config files it writes there for its aggregator and
agent: every setting the demo depends on is in them, so ``WATTMETER_*`` variables and /etc files cannot change it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from collector.config import parse_listen

MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes with its NUL; a little slack


def connect_host(host: str) -> str:
    """The address to reach a server listening on ``host`` from this machine (a wildcard means loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def url(listen: str) -> str:
    """``http://host:port`` of a server listening on ``listen``."""
    host, port = parse_listen(listen)
    host = connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def target(listen: str) -> str:
    """``host:port`` to connect to a gRPC server listening on ``listen``."""
    host, port = parse_listen(listen)
    host = connect_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Layout:
    root: Path
    socket: Path  # in ``root`` unless that path is too long for a Unix socket

    @property
    def database(self) -> Path:
        return self.root / "aggregator.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def load_dir(self) -> Path:
        return self.root / "gpu-load"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def requests_log(self) -> Path:
        return self.root / "requests.jsonl"

    @property
    def agent_config(self) -> Path:
        return self.root / "agent.toml"

    @property
    def aggregator_config(self) -> Path:
        return self.root / "aggregator.toml"

    def create(self) -> None:
        for folder in (self.root, self.logs, self.load_dir, self.spool, self.socket.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.requests_log.write_text("")  # this run's requests only


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_configs(layout: Layout, agent_listen: str, grpc_listen: str, http_listen: str) -> None:
    layout.aggregator_config.write_text(
        "# written by `wattmeter demo`\n"
        "[grpc]\n"
        f"listen = {toml_string(grpc_listen)}\n"
        "[http]\n"
        f"listen = {toml_string(http_listen)}\n"
        "[storage]\n"
        f"url = {toml_string('sqlite:///' + str(layout.database.resolve()))}\n"
        "[ingest]\n"
        "workers = 0  # one process: the demo shares the machine with its own workloads\n"
    )
    layout.agent_config.write_text(
        "# written by `wattmeter demo`; its simulated GPUs come from `python -m collector.demo.agent --gpus N`\n"
        "[prometheus]\n"
        f"listen = {toml_string(agent_listen)}\n"
        "[api]\n"
        f"socket = {toml_string(str(layout.socket.resolve()))}\n"
        "[stream]\n"
        f"target = {toml_string(target(grpc_listen))}\n"
        f"spool_dir = {toml_string(str(layout.spool.resolve()))}\n"
    )
