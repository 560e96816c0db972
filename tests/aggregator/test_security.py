"""TLS, mTLS and bearer tokens on the real gRPC server: the wrong ones are refused with the right status."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.aggregator.conftest import AggregatorFactory, RunningAggregator, now_ns, send, simple_batch
from tests.fakes.certs import Pki, make_pki

SECOND = 1_000_000_000
TOKEN_A = "token-for-host-a-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["host-a", "host-b"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA, with a client cert for host-a that the aggregator's CA never signed."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), ["host-a"])


def channel_to(running: RunningAggregator, ca: Path | None, client: tuple[Path, Path] | None = None) -> grpc.Channel:
    if ca is None:
        return grpc.insecure_channel(running.target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    # the server cert names localhost; the channel dials 127.0.0.1 (localhost may resolve to ::1 first)
    return grpc.secure_channel(running.target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


@pytest.fixture
def mtls(start_aggregator: AggregatorFactory, pki: Pki) -> RunningAggregator:
    return start_aggregator(
        grpc={"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "client_ca": str(pki.ca_cert)}
    )


@pytest.fixture
def tokens(start_aggregator: AggregatorFactory, pki: Pki) -> RunningAggregator:
    digest = "sha256:" + hashlib.sha256(TOKEN_A.encode()).hexdigest()
    return start_aggregator(
        grpc={"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "agent_tokens": {"host-a": digest}}
    )


def stored_hosts(running: RunningAggregator) -> list[str]:
    return [row.hostname for row in running.aggregator.store.hosts()]


def test_mtls_right_cert_passes(mtls: RunningAggregator, pki: Pki) -> None:
    client = pki.clients["host-a"]
    with channel_to(mtls, pki.ca_cert, (client.cert, client.key)) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND, host="host-a")])
    assert result.code is None, result.details
    assert result.acks[0].acked_sequence == 1
    assert stored_hosts(mtls) == ["host-a"]


def test_mtls_host_spoofing_another_host_is_refused(mtls: RunningAggregator, pki: Pki) -> None:
    client = pki.clients["host-a"]
    with channel_to(mtls, pki.ca_cert, (client.cert, client.key)) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND, host="host-b")])
    assert result.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'host-b'" in result.details
    assert "host-a" in result.details
    assert stored_hosts(mtls) == []


def test_mtls_cert_from_another_ca_is_refused(mtls: RunningAggregator, pki: Pki, other_pki: Pki) -> None:
    client = other_pki.clients["host-a"]
    with channel_to(mtls, pki.ca_cert, (client.cert, client.key)) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND, host="host-a")])
    assert result.code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no call ever reaches the service
    assert result.acks == []
    assert stored_hosts(mtls) == []


def test_mtls_without_client_cert_is_refused(mtls: RunningAggregator, pki: Pki) -> None:
    with channel_to(mtls, pki.ca_cert) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND, host="host-a")])
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert stored_hosts(mtls) == []


def test_plain_text_to_a_tls_server_is_refused(mtls: RunningAggregator) -> None:
    with channel_to(mtls, None) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND)])
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert stored_hosts(mtls) == []


def test_server_cert_from_another_ca_is_refused_by_client(mtls: RunningAggregator, pki: Pki, other_pki: Pki) -> None:
    client = pki.clients["host-a"]
    with channel_to(mtls, other_pki.ca_cert, (client.cert, client.key)) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND)])
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert stored_hosts(mtls) == []


@pytest.mark.parametrize(
    ("metadata", "host", "code"),
    [
        ([("authorization", f"Bearer {TOKEN_A}")], "host-a", None),
        ([("authorization", "Bearer wrong-token")], "host-a", grpc.StatusCode.UNAUTHENTICATED),
        ([], "host-a", grpc.StatusCode.UNAUTHENTICATED),
        ([("authorization", TOKEN_A)], "host-a", grpc.StatusCode.UNAUTHENTICATED),  # not "Bearer <token>"
        ([("authorization", f"Bearer {TOKEN_A}")], "host-b", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_tokens(
    tokens: RunningAggregator,
    pki: Pki,
    metadata: list[tuple[str, str]],
    host: str,
    code: grpc.StatusCode | None,
) -> None:
    with channel_to(tokens, pki.ca_cert) as channel:
        result = send(channel, [simple_batch(1, now_ns() - 5 * SECOND, host=host)], metadata=metadata)
    assert result.code == code, result.details
    assert stored_hosts(tokens) == ([host] if code is None else [])
    if code == grpc.StatusCode.UNAUTHENTICATED:
        assert "token" in result.details


def test_mtls_and_token_both_required(start_aggregator: AggregatorFactory, pki: Pki) -> None:
    digest = "sha256:" + hashlib.sha256(TOKEN_A.encode()).hexdigest()
    running = start_aggregator(
        grpc={
            "tls_cert": str(pki.server_cert),
            "tls_key": str(pki.server_key),
            "client_ca": str(pki.ca_cert),
            "agent_tokens": {"host-a": digest},
        }
    )
    client_b = pki.clients["host-b"]
    # host-b's cert with host-a's token: the two identities share no host
    with channel_to(running, pki.ca_cert, (client_b.cert, client_b.key)) as channel:
        batch = simple_batch(1, now_ns() - 5 * SECOND, host="host-b")
        result = send(channel, [batch], metadata=[("authorization", f"Bearer {TOKEN_A}")])
    assert result.code == grpc.StatusCode.PERMISSION_DENIED
    client_a = pki.clients["host-a"]
    with channel_to(running, pki.ca_cert, (client_a.cert, client_a.key)) as channel:
        batch = simple_batch(1, now_ns() - 5 * SECOND, host="host-a")
        result = send(channel, [batch], metadata=[("authorization", f"Bearer {TOKEN_A}")])
    assert result.code is None, result.details


def test_health_service_over_mtls(mtls: RunningAggregator, pki: Pki) -> None:
    client = pki.clients["host-a"]
    with channel_to(mtls, pki.ca_cert, (client.cert, client.key)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "wattmeter.v1.Telemetry"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
