"""The JSON API, /metrics and /healthz of a real aggregator on a free port, fed over real gRPC."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import urllib.parse
import urllib.request
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.store.base import RequestResult, SpanRow
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
    # a duration means that long ago
    status, body = get_json(running, "/api/v1/workloads?phase=inference&since=3h")
    assert [(w["hostname"], w["energy_j"]) for w in body["workloads"]] == [("host-b", 80.0)]
    assert now_ns() - 3 * HOUR - 60 * SECOND < body["since_ns"] <= now_ns() - 3 * HOUR
    status, body = get_json(running, "/api/v1/workloads?phase=inference&since=3h&until=90m")
    assert [w["hostname"] for w in body["workloads"]] == ["host-b"]
    status, body = get_json(running, "/api/v1/workloads?phase=inference&since=1.5h")
    assert body["workloads"] == []


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("/api/v1/samples?host=host-a", "'device' is required"),
        ("/api/v1/samples?device=gpu0", "'host' is required"),
        ("/api/v1/samples?host=host-a&device=gpu0&since=yesterday", "since='yesterday' is neither a whole number"),
        ("/api/v1/samples?host=host-a&device=gpu0&since=-1h", "since='-1h' is neither"),
        ("/api/v1/samples?host=host-a&device=gpu0&since=1h&until=2h", "is after until="),
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


# -- energy per request


def result(request_id: str, start_ns: int, active_j: float | None, **fields: Any) -> RequestResult:
    energies: dict[str, Any] = {}
    if active_j is not None:
        energies = {"active_j": active_j, "full_j": 2 * active_j, "gpu_j": active_j - 1.5, "cpu_j": 1.0}
        energies["dram_j"] = 0.5
    values: dict[str, Any] = {
        "status": "final",
        "model": "llama",
        "hosts": ("host-a",),
        "end_ns": start_ns + 2 * SECOND,
        "input_tokens": 500,
        "output_tokens": 100,
        "spans": 1,
        **energies,
        **fields,
    }
    return RequestResult(request_id, start_ns=start_ns, **values)


@pytest.fixture
def served(start_aggregator: AggregatorFactory) -> tuple[RunningAggregator, int]:
    """An aggregator (its request engine idle: one pass an hour) whose store holds six requests' results, one
    pending request (spans only, ending in the future: the engine leaves it pending) and one without samples."""
    running = start_aggregator(requests={"interval_s": 3600})
    now = now_ns()
    store = running.aggregator.store
    store.write_request_results(
        [
            result("r-1", now - 50 * 60 * SECOND, 10.0, tenant="acme"),
            result("r-2", now - 40 * 60 * SECOND, 20.0, tenant="acme"),
            result("r-3", now - 30 * 60 * SECOND, 30.0, hosts=("host-a", "host-b"), co2_g=3.5),
            result("r-4", now - 20 * 60 * SECOND, 40.0, status="approximate"),
            result("m-1", now - 10 * 60 * SECOND, 4.0, model="mistral", output_tokens=0, hosts=("host-b",)),
            result("old", now - 3 * HOUR, 1000.0),
            result("none", now - 5 * 60 * SECOND, None, status="no_samples"),
        ]
    )
    store.write_spans(
        [SpanRow("pending/ü 1", "s1", "host-a", now + HOUR, now + HOUR + SECOND, model="llama", output_tokens=7)]
    )
    return running, now


def test_a_request_by_id(served: tuple[RunningAggregator, int]) -> None:
    running, now = served
    status, body = get_json(running, "/api/v1/requests/r-3")
    assert status == 200
    assert body == {
        "request_id": "r-3",
        "model": "llama",
        "tenant": "",
        "hosts": ["host-a", "host-b"],
        "start_ns": now - 30 * 60 * SECOND,
        "end_ns": now - 30 * 60 * SECOND + 2 * SECOND,
        "input_tokens": 500,
        "output_tokens": 100,
        "status": "final",
        "energy_j": {"active": 30.0, "full": 60.0, "gpu": 28.5, "cpu": 1.0, "dram": 0.5},
        "joules_per_output_token": 0.3,
        "co2_g": 3.5,
        "cost": None,
        "spans": 1,
        "updated_ns": 0,
    }
    # an id with a slash and a non-ASCII letter, percent-encoded; pending: no energy yet
    status, body = get_json(running, "/api/v1/requests/" + urllib.parse.quote("pending/ü 1", safe=""))
    assert status == 200
    assert (body["request_id"], body["status"], body["output_tokens"]) == ("pending/ü 1", "pending", 7)
    assert body["energy_j"] == {"active": None, "full": None, "gpu": None, "cpu": None, "dram": None}
    assert body["joules_per_output_token"] is None
    status, body = get_json(running, "/api/v1/requests/none")
    assert (body["status"], body["energy_j"]["active"]) == ("no_samples", None)
    status, body = get_json(running, "/api/v1/requests/nope")
    assert status == 404
    assert body == {"error": "request 'nope' is unknown: no span of it has arrived, or it was pruned"}
    assert get_json(running, "/api/v1/requests/r-3?x=1") == (
        400,
        {"error": "unknown parameter 'x'; this endpoint takes no parameters"},
    )
    assert http_get(running.http_url + "/api/v1/requests/")[0] == 404


def test_requests_by_window_model_and_energy(served: tuple[RunningAggregator, int]) -> None:
    running, now = served

    def ids(query: str = "") -> list[str]:
        status, body = get_json(running, "/api/v1/requests" + query)
        assert status == 200, body
        return [r["request_id"] for r in body["requests"]]

    assert ids() == ["none", "m-1", "r-4", "r-3", "r-2", "r-1"]  # the last hour, newest first
    assert ids("?model=llama") == ["none", "r-4", "r-3", "r-2", "r-1"]
    assert ids("?model=llama&limit=2") == ["none", "r-4"]
    assert ids("?order=energy&limit=3") == ["r-4", "r-3", "r-2"]
    assert ids("?since=4h&until=2h") == ["old"]
    assert ids(f"?since={now - 35 * 60 * SECOND}&until=15m") == ["r-4", "r-3"]
    assert ids(f"?since={now}&until={now + 2 * HOUR}") == ["pending/ü 1"]
    _, body = get_json(running, "/api/v1/requests?model=mistral")
    assert body["requests"][0]["joules_per_output_token"] is None  # no output tokens
    assert body["until_ns"] - body["since_ns"] == HOUR


def test_summary_per_model_host_and_tenant(served: tuple[RunningAggregator, int]) -> None:
    running, _ = served
    status, body = get_json(running, "/api/v1/summary")
    assert status == 200
    assert body["by"] == "model"
    assert body["until_ns"] - body["since_ns"] == HOUR
    # llama, final and approximate in the last hour: 10 20 30 40 J; p95 at rank 0.95 x 3 = 2.85: 30 + 0.85 x 10
    llama = {
        "group": "llama",
        "count": 4,
        "energy_j": 100.0,
        "p50_j": 25.0,
        "p95_j": pytest.approx(38.5),
        "output_tokens": 400,
        "joules_per_output_token": 0.25,
    }
    mistral = {
        "group": "mistral",
        "count": 1,
        "energy_j": 4.0,
        "p50_j": 4.0,
        "p95_j": 4.0,
        "output_tokens": 0,
        "joules_per_output_token": None,
    }
    assert body["groups"] == [llama, mistral]
    status, body = get_json(running, "/api/v1/summary?by=host")
    # r-3 ran on both hosts: it counts in each
    assert [(g["group"], g["count"], g["energy_j"]) for g in body["groups"]] == [
        ("host-a", 4, 100.0),
        ("host-b", 2, 34.0),
    ]
    status, body = get_json(running, "/api/v1/summary?by=tenant&since=4h")
    assert [(g["group"], g["count"], g["energy_j"]) for g in body["groups"]] == [("", 4, 1074.0), ("acme", 2, 30.0)]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("/api/v1/requests?limit=0", "limit=0 is outside 1..10000"),
        ("/api/v1/requests?limit=ten", "limit='ten' is not a whole number"),
        ("/api/v1/requests?order=tokens", "order='tokens' is not one of start, energy"),
        ("/api/v1/requests?since=yesterday", "since='yesterday' is neither a whole number of Unix nanoseconds"),
        ("/api/v1/requests?since=1h&until=2h", "is after until"),
        ("/api/v1/requests?tenant=acme", "unknown parameter 'tenant'"),
        ("/api/v1/summary?by=job", "by='job' is not one of model, tenant, host"),
        ("/api/v1/summary?until=soon", "until='soon' is neither"),
    ],
)
def test_bad_request_parameters_are_400_with_a_reason(
    served: tuple[RunningAggregator, int], query: str, words: str
) -> None:
    status, body = get_json(served[0], query)
    assert status == 400
    assert words in body["error"]
