"""Review of the per-request API (``/api/v1/requests``, ``/api/v1/requests/{id}``, ``/api/v1/summary``) and
``wattmeter requests``: odd parameters are 400s (never 500s), the summary's percentiles are numpy's linear ones over
final and approximate requests only, and the command's user-caused failures are one line on stderr, never a
traceback."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collector.aggregator.http_api import HttpApi
from collector.cli import main
from collector.store import Store
from collector.store.base import SpanRow
from tests.aggregator.conftest import RunningAggregator, base_config, http_get
from tests.aggregator.test_http_api import result

S = 1_000_000_000
NOW = 1_800_000_000 * S  # the API's clock in the store tests
HOUR = 3600 * S


def answer(api: HttpApi, path: str, query: str = "") -> tuple[int, Any]:
    if path.startswith("/api/v1/requests/"):
        status, body, _ = api.prefix_routes()["/api/v1/requests/"](path[len("/api/v1/requests/") :], query)
    else:
        status, body, _ = api.routes()[path](query)
    return int(status), json.loads(body)


@pytest.fixture
def api(store: Store) -> HttpApi:
    return HttpApi(store, clock_ns=lambda: NOW)


# -- parameters: 400 with the parameter named, never a 500


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("digits", [300, 400])
def test_a_huge_duration_ago_is_the_epoch_not_a_500(api: HttpApi, name: str, digits: int) -> None:
    # "999...9d" is a duration ago like any other, only longer than the epoch: it means 0 (as "100000d" does)
    status, body = answer(api, "/api/v1/requests", f"{name}={'9' * digits}d")
    assert status == 200, body
    assert body[f"{name}_ns"] == 0
    status, body = answer(api, "/api/v1/summary", f"{name}={'9' * digits}d")
    assert status == 200, body


def test_a_huge_duration_through_the_server_is_not_a_500(tmp_path: Path) -> None:
    running = RunningAggregator(base_config(tmp_path, requests={"interval_s": 3600}))
    try:
        status, body = http_get(running.http_url + "/api/v1/requests?since=" + "9" * 400 + "d")
        assert status == 200, body
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("path", "query", "words"),
    [
        ("/api/v1/requests", "since=abc", "since='abc' is neither"),
        ("/api/v1/requests", "until=1.5", "until='1.5' is neither"),
        ("/api/v1/requests", "limit=-3", "limit=-3 is outside 1..10000"),
        ("/api/v1/requests", "limit=10001", "limit=10001 is outside 1..10000"),
        ("/api/v1/requests", "limit=" + "9" * 30, "is outside 1..10000"),
        ("/api/v1/requests", "limit=2.5", "limit='2.5' is not a whole number"),
        ("/api/v1/requests", f"since={NOW}&until={NOW - 1}", "is after until"),
        ("/api/v1/requests", "model=a&model=b", "parameter 'model' given twice"),
        ("/api/v1/requests", "limit", "is not name=value pairs"),
        ("/api/v1/summary", "by=gpu", "by='gpu' is not one of model, tenant, host"),
        ("/api/v1/summary", "by=model&by=host", "parameter 'by' given twice"),
        ("/api/v1/summary", "limit=5", "unknown parameter 'limit'"),
        ("/api/v1/summary", "since=%00", "since='\\x00' is neither"),
    ],
)
def test_bad_parameters_are_400_naming_them(api: HttpApi, path: str, query: str, words: str) -> None:
    status, body = answer(api, path, query)
    assert status == 400
    assert words in body["error"]


def test_ids_with_slashes_unicode_and_nul(api: HttpApi, store: Store) -> None:
    store.write_request_results([result("a/b ü", NOW - 60 * S, 5.0), result("nul\0id", NOW - 30 * S, 6.0)])
    assert answer(api, "/api/v1/requests/a/b ü")[1]["energy_j"]["active"] == 5.0
    # NUL is stored as U+FFFD on both backends: looked up the same way
    status, body = answer(api, "/api/v1/requests/nul\0id")
    assert (status, body["request_id"]) == (200, "nul\ufffdid")
    status, body = answer(api, "/api/v1/requests/nope\0")
    assert status == 404 and "unknown" in body["error"]


# -- summary: numpy's percentiles over final and approximate requests; J per token without tokens


def test_summary_percentiles_are_numpys_over_finished_requests_only(api: HttpApi, store: Store) -> None:
    energies = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0, 35.0, 8.9, 7.9, 0.3]
    store.write_request_results(
        [
            *(result(f"r{i}", NOW - (i + 1) * 60 * S, j, output_tokens=i) for i, j in enumerate(energies)),
            result("approx", NOW - 20 * 60 * S, 2.0, status="approximate", output_tokens=0),
            result("nos", NOW - 21 * 60 * S, None, status="no_samples"),
            result("zero-tokens", NOW - 22 * 60 * S, 12.0, model="mistral", output_tokens=0),
        ]
    )
    store.write_spans([SpanRow("pend", "s1", "host-a", NOW + HOUR, NOW + HOUR + S, model="llama", output_tokens=7)])
    status, body = answer(api, "/api/v1/summary", f"since={NOW - HOUR}&until={NOW + 2 * HOUR}")
    assert status == 200
    llama, mistral = body["groups"]
    finished = [*energies, 2.0]
    assert llama["count"] == len(finished)  # neither the no_samples nor the pending one
    assert llama["energy_j"] == pytest.approx(sum(finished))
    assert llama["p50_j"] == pytest.approx(float(np.percentile(finished, 50)))
    assert llama["p95_j"] == pytest.approx(float(np.percentile(finished, 95)))
    assert llama["output_tokens"] == sum(range(len(energies)))
    assert llama["joules_per_output_token"] == pytest.approx(sum(finished) / sum(range(len(energies))))
    assert mistral == {
        "group": "mistral",
        "count": 1,
        "energy_j": 12.0,
        "p50_j": 12.0,
        "p95_j": 12.0,
        "output_tokens": 0,
        "joules_per_output_token": None,
    }


def test_requests_newest_first_or_most_energy_first_with_ties_by_id(api: HttpApi, store: Store) -> None:
    t = NOW - 10 * 60 * S
    store.write_request_results(
        [
            result("b", t, 1.0),
            result("a", t, 1.0),
            result("c", t - S, 50.0),
            result("n", t + S, None, status="no_samples"),
        ]
    )

    def ids(query: str) -> list[str]:
        status, body = answer(api, "/api/v1/requests", query)
        assert status == 200, body
        return [r["request_id"] for r in body["requests"]]

    assert ids("") == ["n", "a", "b", "c"]
    assert ids("order=energy") == ["c", "a", "b", "n"]  # unknown energy last
    assert ids("order=energy&limit=2") == ["c", "a"]
    assert ids(f"until={t}") == ["c"]  # until is exclusive, since inclusive
    assert ids(f"since={t}&until={t + 1}") == ["a", "b"]


# -- the command


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAggregator]:
    running = RunningAggregator(base_config(tmp_path_factory.mktemp("review"), requests={"interval_s": 3600}))
    try:
        store = running.aggregator.store
        store.write_request_results(
            [
                result("odd", NOW - 60 * S, 41.2, model='llama, "70b"\nv2', tenant="a,b"),
                result("nos", NOW - 50 * S, None, status="no_samples", model="", tenant=""),
            ]
        )
        store.write_spans([SpanRow("pend", "s1", "host-a", 4_000_000_000 * S, 4_000_000_001 * S)])
        yield running
    finally:
        running.stop()


WINDOW = ["--since", str(NOW - HOUR), "--until", str(NOW + HOUR)]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["requests", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_csv_escapes_commas_quotes_and_newlines(running: RunningAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "top", *WINDOW, "--format", "csv", "--url", running.http_url)
    assert (code, err) == (0, "")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["request_id"], r["model"], r["tenant"], r["active_j"]) for r in rows] == [
        ("odd", 'llama, "70b"\nv2', "a,b", "41.2"),
        ("nos", "", "", ""),
    ]
    code, out, _ = run(capsys, "summary", *WINDOW, "--by", "tenant", "--format", "csv", "--url", running.http_url)
    assert code == 0
    assert [(r["tenant"], r["count"]) for r in csv.DictReader(io.StringIO(out))] == [("a,b", "1")]


def test_json_is_json_and_tables_show_unknowns(running: RunningAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    for action in (["top", *WINDOW], ["summary", *WINDOW], ["show", "nos"], ["show", "pend"]):
        code, out, err = run(capsys, *action, "--format", "json", "--url", running.http_url)
        assert (code, err) == (0, "")
        json.loads(out)
    code, out, _ = run(capsys, "show", "pend", "--url", running.http_url)
    assert code == 0 and "not computed yet" in out
    code, out, _ = run(capsys, "show", "nos", "--url", running.http_url)
    assert code == 0 and "unknown: no samples for its time" in out
    code, out, _ = run(capsys, "top", *WINDOW, "--url", running.http_url)
    assert code == 0 and out.splitlines()[-1].split()[:4] == ["nos", "-", "-", "no_samples"]
    # the show id travels percent-encoded: a slash, a question mark and a NUL are part of it
    for request_id in ("a/b", "a?b", "x\0y"):
        code, out, err = run(capsys, "show", request_id, "--url", running.http_url)
        assert code == 1 and "is unknown" in err and err.count("\n") == 1


def one_line_failure(capsys: pytest.CaptureFixture[str], args: list[str], exit_code: int, words: str) -> None:
    code, out, err = run(capsys, *args)
    assert (code, out) == (exit_code, "")
    assert err.startswith("wattmeter: ") and err.count("\n") == 1, err
    assert words in err


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:abc", "--url 'http://127.0.0.1:abc' is not"),
        ("http://127.0.0.1:70000", "--url 'http://127.0.0.1:70000' is not"),
        ("http://[::1", "--url 'http://[::1' is not"),
        ("http://exa mple.com", "--url 'http://exa mple.com' is not"),
    ],
)
def test_a_malformed_url_is_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], url: str, words: str) -> None:
    one_line_failure(capsys, ["show", "x", "--url", url], 2, words)


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf"])
def test_a_bad_timeout_is_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], timeout: str) -> None:
    one_line_failure(capsys, ["show", "x", "--url", "http://127.0.0.1:1", "--timeout", timeout], 2, "--timeout")


@pytest.fixture
def not_http() -> Iterator[str]:
    """A server that answers anything with a line that is not HTTP."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with client:
                client.recv(4096)
                client.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    thread.join(5)


def test_a_server_that_is_not_http_is_exit_1_with_one_line(capsys: pytest.CaptureFixture[str], not_http: str) -> None:
    one_line_failure(capsys, ["summary", "--url", not_http], 1, "did not answer HTTP")


def test_an_empty_id_is_a_usage_error(running: RunningAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    # not "has no request API": the aggregator is fine, the id is missing
    one_line_failure(capsys, ["show", "", "--url", running.http_url], 2, "request ID")


def test_an_argument_that_is_not_utf8_is_no_traceback(
    running: RunningAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    # a byte that is not UTF-8 on the command line arrives as a surrogate escape (os.fsdecode)
    one_line_failure(capsys, ["show", "bad\udcff", "--url", running.http_url], 1, "is unknown")
    code, out, err = run(capsys, "top", *WINDOW, "--model", "bad\udcff", "--url", running.http_url)
    assert (code, err) == (0, "") and out.startswith("no requests from")


def test_quoted_ids_reach_the_api(running: RunningAggregator) -> None:
    status, _ = http_get(running.http_url + "/api/v1/requests/" + urllib.parse.quote("odd", safe=""))
    assert status == 200


def raw_get(url: str, target: bytes) -> tuple[int, Any]:
    """GET with ``target`` sent as it is on the request line (curl sends non-ASCII unencoded)."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_target_sent_as_raw_utf8_means_what_it_says(running: RunningAggregator) -> None:
    running.aggregator.store.write_request_results([result("ü-1", NOW - 60 * S, 5.0, model="modèle")])
    status, body = raw_get(running.http_url, "/api/v1/requests/ü-1".encode())
    assert (status, body["request_id"], body["model"]) == (200, "ü-1", "modèle")
    status, body = raw_get(running.http_url, f"/api/v1/requests?model=modèle&since=0&until={NOW}".encode())
    assert status == 200 and [r["request_id"] for r in body["requests"]] == ["ü-1"]
    # bytes that are not UTF-8 stay as read (Latin-1): an unknown id here, and no error
    status, body = raw_get(running.http_url, b"/api/v1/requests/\xff-1")
    assert status == 404 and "unknown" in body["error"]
