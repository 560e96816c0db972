"""The JSON API, /metrics and /healthz of a real aggregator on a free port, fed over real gRPC."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import urllib.request
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.aggregator.conftest import (
    AggregatorFactory,
    RunningAggregator,
    batch,
    device,
    http_get,
    now_ns,
    send,
    simple_batch,
    workload,
)

SECOND = 1_000_000_000
HOUR = 3600 * SECOND


def get_json(running: RunningAggregator, path: str) -> tuple[int, Any]:
    status, body = http_get(running.http_url + path)
    return status, json.loads(body)


@pytest.fixture
def fed(aggregator: RunningAggregator, channel: grpc.Channel) -> tuple[RunningAggregator, int]:
    """Two batches of host-a (one with a NaN power reading) and one of host-b two hours ago."""
    start = now_ns() - 10 * SECOND
    second = simple_batch(2, start + SECOND, energy0=1090.0)
    second.devices[0].power_w[1] = math.nan
    old = batch(
        1,
        [device("cpu0", [start - 2 * HOUR, start - 2 * HOUR + SECOND], [5.0, 105.0], kind="cpu")],
        [workload("serve", "inference", "cpu0", [start - 2 * HOUR, start - 2 * HOUR + SECOND], [0.0, 80.0])],
        instance="instance-b",
        host="host-b",
    )
    result = send(channel, [simple_batch(1, start), second, old])
    assert [a.rejected_sequence for a in result.acks] == [0, 0, 0]
    return aggregator, start


def test_hosts(fed: tuple[RunningAggregator, int]) -> None:
    running, _ = fed
    status, body = get_json(running, "/api/v1/hosts")
    assert status == 200
    hosts = {h["hostname"]: h for h in body["hosts"]}
    assert set(hosts) == {"host-a", "host-b"}
    assert hosts["host-a"]["machine_id"] == "m-host-a"
    assert [(d["device_id"], d["kind"], d["in_host_total"]) for d in hosts["host-a"]["devices"]] == [
        ("gpu0", "gpu", True)
    ]


def test_device_samples_default_window_and_null_power(fed: tuple[RunningAggregator, int]) -> None:
    running, start = fed
    status, body = get_json(running, "/api/v1/samples?host=host-a&device=gpu0")
    assert status == 200
    assert (body["host"], body["device"]) == ("host-a", "gpu0")
    samples = body["samples"]
    assert len(samples) == 20
    assert samples[0] == [start, 1000.0, 100.0]
    assert samples[11] == [start + SECOND + 100_000_000, 1100.0, None]
    # host-b's samples are two hours old: outside the default window (the last hour), inside an explicit one
    assert get_json(running, "/api/v1/samples?host=host-b&device=cpu0")[1]["samples"] == []
    since, until = start - 3 * HOUR, start - HOUR
    status, body = get_json(running, f"/api/v1/samples?host=host-b&device=cpu0&since={since}&until={until}")
    assert [e for _, e, _ in body["samples"]] == [5.0, 105.0]
    window = f"since={start + SECOND}&until={start + SECOND + 300_000_000}"
    status, body = get_json(running, f"/api/v1/samples?host=host-a&device=gpu0&{window}")
    assert [t for t, _, _ in body["samples"]] == [start + SECOND + i * 100_000_000 for i in range(3)]


def test_workload_samples(fed: tuple[RunningAggregator, int]) -> None:
    running, start = fed
    status, body = get_json(running, "/api/v1/samples?host=host-a&device=gpu0&workload=train&phase=training")
    assert status == 200
    assert body["workload"] == {"workload": "train", "phase": "training", "job": ""}
    assert body["samples"][:2] == [[start, 0.0], [start + 100_000_000, 6.0]]
    status, body = get_json(running, "/api/v1/samples?host=host-a&device=gpu0&workload=idle")
    assert len(body["samples"]) == 20


def test_workloads(fed: tuple[RunningAggregator, int]) -> None:
    running, start = fed
    status, body = get_json(running, "/api/v1/workloads")
    assert status == 200
    energy = {(w["hostname"], w["workload"], w["phase"]): w["energy_j"] for w in body["workloads"]}
    assert energy == {("host-a", "train", "training"): 108.0, ("host-a", "idle", ""): 72.0}
    status, body = get_json(running, "/api/v1/workloads?phase=idle")
    assert [(w["workload"], w["by_device_j"]) for w in body["workloads"]] == [("idle", {"gpu0": 72.0})]
    status, body = get_json(running, "/api/v1/workloads?phase=inference")
    assert body["workloads"] == []  # host-b's are older than the default hour
    status, body = get_json(running, f"/api/v1/workloads?phase=inference&since={start - 3 * HOUR}")
    assert [(w["hostname"], w["energy_j"]) for w in body["workloads"]] == [("host-b", 80.0)]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("/api/v1/samples?host=host-a", "'device' is required"),
        ("/api/v1/samples?device=gpu0", "'host' is required"),
        ("/api/v1/samples?host=host-a&device=gpu0&since=yesterday", "since='yesterday' is not a whole number"),
        ("/api/v1/samples?host=host-a&device=gpu0&since=20&until=10", "since=20 is after until=10"),
        ("/api/v1/samples?host=host-a&device=gpu0&until=-5", "outside"),
        ("/api/v1/samples?host=host-a&device=gpu0&phase=training", "give workload too"),
        ("/api/v1/samples?host=host-a&device=gpu0&host=host-b", "given twice"),
        ("/api/v1/workloads?phase=serving", "phase='serving' is not one of"),
        ("/api/v1/workloads?sinse=5", "unknown parameter 'sinse'"),
        ("/api/v1/hosts?x=1", "unknown parameter 'x'"),
    ],
)
def test_bad_parameters_are_400_with_a_reason(aggregator: RunningAggregator, query: str, words: str) -> None:
    status, body = get_json(aggregator, query)
    assert status == 400
    assert words in body["error"]


def test_metrics_healthz_and_read_only(fed: tuple[RunningAggregator, int]) -> None:
    running, _ = fed
    status, body = http_get(running.http_url + "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("wattmeter_fleet_energy_joules_total", (("host", "host-a"), ("phase", "training")))] == 108.0
    assert samples[("wattmeter_fleet_energy_joules_total", (("host", "host-b"), ("phase", "inference")))] == 80.0
    assert samples[("wattmeter_aggregator_batches_total", (("result", "stored"),))] == 3.0
    assert http_get(running.http_url + "/healthz") == (200, b"ok\n")
    request = urllib.request.Request(running.http_url + "/api/v1/hosts", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 405


def test_basic_auth_protects_api_and_metrics_not_healthz(start_aggregator: AggregatorFactory) -> None:
    digest = "sha256:" + hashlib.sha256(b"s3cret").hexdigest()
    running = start_aggregator(http={"basic_auth": {"username": "grafana", "password_hash": digest}})
    good = {"Authorization": "Basic " + base64.b64encode(b"grafana:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"grafana:guess").decode()}
    for path in ("/api/v1/hosts", "/metrics"):
        assert http_get(running.http_url + path)[0] == 401
        assert http_get(running.http_url + path, bad)[0] == 401
        assert http_get(running.http_url + path, good)[0] == 200
    assert http_get(running.http_url + "/healthz")[0] == 200
