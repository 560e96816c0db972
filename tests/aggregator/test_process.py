"""``wattmeter aggregator`` as a real process: starts, stores a batch, answers health checks, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.aggregator.conftest import WAIT_S, http_get, now_ns, send, simple_batch
from tests.fakes.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SECOND = 1_000_000_000


def run_aggregator(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "collector", "aggregator", *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


class Process:
    def __init__(self, tmp_path: Path, workers: int = 0) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.workers = workers
        self.config = tmp_path / "aggregator.toml"
        self.config.write_text(
            f"""
[grpc]
listen = "127.0.0.1:{self.grpc_port}"

[http]
listen = "127.0.0.1:{self.http_port}"

[storage]
url = "sqlite:///{tmp_path / "aggregator.db"}"

[ingest]
workers = {workers}
"""
        )
        self.proc = run_aggregator("--config", str(self.config))
        self.url = f"http://127.0.0.1:{self.http_port}"

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"aggregator exited early:\n{self.proc.stdout.read()}")  # type: ignore[union-attr]
            try:
                if http_get(self.url + "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("aggregator did not become healthy")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT_S)


@pytest.fixture(params=[0, 2], ids=["no-workers", "2-workers"])
def process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Process]:
    started = Process(tmp_path, workers=request.param)
    try:
        started.wait_healthy()
        yield started
    finally:
        started.kill()


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie is gone, waiting to be reaped


def test_serves_stores_and_stops_on_sigterm(process: Process) -> None:
    workers = children(process.proc.pid)
    with grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}") as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND)])
        assert result.code is None, result.details
        assert result.acks[0].acked_sequence == 1
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    status, body = http_get(process.url + "/api/v1/hosts")
    assert status == 200
    assert b'"hostname":"host-a"' in body
    begun = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    code = process.proc.wait(timeout=10)
    elapsed = time.monotonic() - begun
    assert code == 0, process.proc.stdout.read()  # type: ignore[union-attr]
    assert elapsed < 2.0, elapsed
    assert len(workers) == process.workers
    assert not [pid for pid in workers if alive(pid)]  # its worker processes went with it


def test_config_error_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text('[grpc]\nlisten = "0.0.0.0:9751"\n')
    proc = run_aggregator("--config", str(config))
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 2
    assert "grpc: " in out
    assert "set tls_cert and tls_key" in out
    assert "Traceback" not in out


def test_taken_port_is_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_aggregator(
            "--config",
            str(tmp_path / "empty.toml"),
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            f"127.0.0.1:{port}",
            "--storage-url",
            f"sqlite:///{tmp_path / 'a.db'}",
        )
        out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 1, out
    assert "cannot serve" in out
    assert "Traceback" not in out


def test_environment_feeds_the_config(tmp_path: Path) -> None:
    http_port = free_port()
    (tmp_path / "empty.toml").write_text("")
    proc = run_aggregator(
        "--config",
        str(tmp_path / "empty.toml"),
        env={
            "WATTMETER_GRPC__LISTEN": "127.0.0.1:0",
            "WATTMETER_HTTP__LISTEN": f"127.0.0.1:{http_port}",
            "WATTMETER_STORAGE__URL": f"sqlite:///{tmp_path / 'env.db'}",
        },
    )
    try:
        deadline = time.monotonic() + WAIT_S
        url = f"http://127.0.0.1:{http_port}/healthz"
        while not (tmp_path / "env.db").exists() or http_get_or_none(url) != 200:
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the aggregator did not come up on the environment's addresses"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT_S)


def http_get_or_none(url: str) -> int | None:
    try:
        return http_get(url)[0]
    except OSError:
        return None
