"""``wattmeter requests show | top | summary`` against a real aggregator's HTTP API on a free port (its store
filled with known results), in all three formats, and its one-line errors."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.cli import main
from collector.cli_requests import CSV_REQUEST_COLUMNS, si
from collector.store.base import RequestResult, SpanRow
from tests.aggregator.conftest import RunningAggregator, base_config
from tests.fakes.ports import free_port

S = 1_000_000_000
T0 = 1_800_000_000 * S  # 2027-01-15 08:00:00 UTC
WINDOW = ["--since", str(T0 - 3600 * S), "--until", str(T0 + 3600 * S)]


def result(request_id: str, offset_s: int, active_j: float, **fields: object) -> RequestResult:
    values: dict[str, object] = {
        "status": "final",
        "model": "llama-70b",
        "hosts": ("gpu-node-1",),
        "start_ns": T0 + offset_s * S,
        "end_ns": T0 + offset_s * S + 2 * S,
        "input_tokens": 100,
        "output_tokens": 100,
        "active_j": active_j,
        "full_j": 2 * active_j,
        "gpu_j": active_j - 1.0,
        "cpu_j": 0.75,
        "dram_j": 0.25,
        "spans": 1,
        **fields,
    }
    return RequestResult(request_id, **values)  # type: ignore[arg-type]


SHOWN = result(
    "req-42",
    0,
    41.2,
    tenant="acme",
    hosts=("gpu-node-1", "gpu-node-2"),
    end_ns=T0 + 2_350_000_000,
    input_tokens=512,
    output_tokens=128,
    full_j=1300.0,
    gpu_j=38.0,
    cpu_j=2.9,
    dram_j=0.3,
)


def fill(running: RunningAggregator) -> None:
    store = running.aggregator.store
    store.write_request_results(
        [
            SHOWN,
            result("req-1", 10, 10.0, tenant="acme"),
            result("req-2", 20, 900.0),
            result("req-3", 30, 0.5, model="mistral-7b", output_tokens=0),
        ]
    )
    # pending: its span ends in the future, so the request engine leaves it so
    far = 4_000_000_000 * S
    store.write_spans([SpanRow("req-pending", "s1", "gpu-node-1", far, far + S, model="llama-70b")])


@pytest.fixture(scope="module")
def aggregator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAggregator]:
    # the request engine makes one pass an hour: it leaves the results written here alone
    running = RunningAggregator(base_config(tmp_path_factory.mktemp("cli"), requests={"interval_s": 3600}))
    try:
        fill(running)
        yield running
    finally:
        running.stop()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["requests", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(capsys: pytest.CaptureFixture[str], running: RunningAggregator, *args: str) -> str:
    code, out, err = run(capsys, *args, "--url", running.http_url)
    assert (code, err) == (0, "")
    return out


# -- show


def test_show_as_a_table_with_si_prefixes(aggregator: RunningAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    assert ok(capsys, aggregator, "show", "req-42") == (
        "request    req-42\n"
        "status     final\n"
        "model      llama-70b\n"
        "tenant     acme\n"
        "hosts      gpu-node-1, gpu-node-2\n"
        "start      2027-01-15 08:00:00.000Z\n"
        "duration   2.35 s\n"
        "tokens     512 in, 128 out\n"
        "energy     41.2 J active, 1.3 kJ full\n"
        "parts      38 J GPU, 2.9 J CPU, 300 mJ DRAM\n"
        "per token  322 mJ per output token\n"
    )
    pending = ok(capsys, aggregator, "show", "req-pending")
    assert "status    pending\n" in pending  # narrower: no "per token" line
    assert "energy    not computed yet\n" in pending


def test_show_as_json_and_csv_carries_raw_joules(
    aggregator: RunningAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = json.loads(ok(capsys, aggregator, "show", "req-42", "--format", "json"))
    with urllib.request.urlopen(aggregator.http_url + "/api/v1/requests/req-42", timeout=30) as response:
        assert shown == json.loads(response.read())
    assert shown["energy_j"] == {"active": 41.2, "full": 1300.0, "gpu": 38.0, "cpu": 2.9, "dram": 0.3}
    rows = list(csv.reader(io.StringIO(ok(capsys, aggregator, "show", "req-42", "--format", "csv"))))
    assert rows[0] == list(CSV_REQUEST_COLUMNS)
    assert dict(zip(rows[0], rows[1], strict=True)) == {
        "request_id": "req-42",
        "status": "final",
        "model": "llama-70b",
        "tenant": "acme",
        "hosts": "gpu-node-1;gpu-node-2",
        "start_ns": str(T0),
        "end_ns": str(T0 + 2_350_000_000),
        "input_tokens": "512",
        "output_tokens": "128",
        "active_j": "41.2",
        "full_j": "1300.0",
        "gpu_j": "38.0",
        "cpu_j": "2.9",
        "dram_j": "0.3",
        "joules_per_output_token": repr(41.2 / 128),
    }
    pending = list(csv.reader(io.StringIO(ok(capsys, aggregator, "show", "req-pending", "--format", "csv"))))
    assert pending[1][CSV_REQUEST_COLUMNS.index("active_j")] == ""  # unknown, not 0


# -- top and summary


def test_top_by_energy_or_newest_filtered_by_model(
    aggregator: RunningAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ok(capsys, aggregator, "top", *WINDOW).splitlines() == [
        "REQUEST  MODEL       TENANT  STATUS  START                       TIME  OUT TOK  ACTIVE    FULL  PER TOKEN",
        "req-2    llama-70b   -       final   2027-01-15 08:00:20.000Z     2 s      100   900 J  1.8 kJ        9 J",
        "req-42   llama-70b   acme    final   2027-01-15 08:00:00.000Z  2.35 s      128  41.2 J  1.3 kJ     322 mJ",
        "req-1    llama-70b   acme    final   2027-01-15 08:00:10.000Z     2 s      100    10 J    20 J     100 mJ",
        "req-3    mistral-7b  -       final   2027-01-15 08:00:30.000Z     2 s        0  500 mJ     1 J          -",
    ]
    newest = ok(capsys, aggregator, "top", *WINDOW, "--sort", "start", "--limit", "2", "--format", "json")
    assert [r["request_id"] for r in json.loads(newest)["requests"]] == ["req-3", "req-2"]
    mistral = list(
        csv.reader(io.StringIO(ok(capsys, aggregator, "top", *WINDOW, "--model", "mistral-7b", "--format", "csv")))
    )
    assert [row[0] for row in mistral] == ["request_id", "req-3"]
    assert mistral[1][CSV_REQUEST_COLUMNS.index("joules_per_output_token")] == ""  # no output tokens
    empty = ok(capsys, aggregator, "top", "--since", str(S), "--until", str(2 * S))
    assert empty == "no requests from 1970-01-01 00:00:01.000Z to 1970-01-01 00:00:02.000Z\n"


def test_summary_per_model_and_host(aggregator: RunningAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    assert ok(capsys, aggregator, "summary", *WINDOW).splitlines() == [
        "MODEL       REQUESTS  ENERGY     P50     P95  OUT TOK  PER TOKEN",
        "llama-70b          3   951 J  41.2 J   814 J      328      2.9 J",
        "mistral-7b         1  500 mJ  500 mJ  500 mJ        0          -",
    ]
    # llama: 10, 41.2, 900 J; p95 at rank 1.9: 41.2 + 0.9 x 858.8
    rows = list(csv.reader(io.StringIO(ok(capsys, aggregator, "summary", *WINDOW, "--by", "host", "--format", "csv"))))
    assert rows[0] == ["host", "count", "energy_j", "p50_j", "p95_j", "output_tokens", "joules_per_output_token"]
    assert [(row[0], row[1], float(row[2])) for row in rows[1:]] == [
        ("gpu-node-1", "4", pytest.approx(951.7)),
        ("gpu-node-2", "1", 41.2),
    ]
    answer = json.loads(ok(capsys, aggregator, "summary", *WINDOW, "--by", "tenant", "--format", "json"))
    assert answer["by"] == "tenant"
    assert [(g["group"], g["count"]) for g in answer["groups"]] == [("", 2), ("acme", 2)]


# -- errors: one line, no traceback


def test_an_unknown_request_is_exit_1_with_one_line(
    aggregator: RunningAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "show", "nope", "--url", aggregator.http_url)
    assert (code, out) == (1, "")
    assert err == "wattmeter: request 'nope' is unknown: no span of it has arrived, or it was pruned\n"


def test_a_refused_parameter_is_exit_2_with_the_aggregators_reason(
    aggregator: RunningAggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "top", "--since", "yesterday", "--url", aggregator.http_url)
    assert code == 2
    assert err.startswith("wattmeter: since='yesterday' is neither a whole number of Unix nanoseconds")
    assert err.count("\n") == 1


def test_an_unreachable_aggregator_is_exit_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "summary", "--url", url)
    assert (code, out) == (1, "")
    assert err.startswith(f"wattmeter: cannot reach the aggregator at {url}: ")
    assert "--url" in err and err.count("\n") == 1
    code, _, err = run(capsys, "show", "x", "--url", "ftp://example")
    assert code == 2 and "is not an http:// or https:// address" in err


def test_not_an_aggregator_says_so(aggregator: RunningAggregator, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "show", "req-42", "--url", aggregator.http_url + "/elsewhere")
    assert code == 1
    assert "has no request API" in err


def test_url_from_the_environment(
    aggregator: RunningAggregator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATTMETER_AGGREGATOR_URL", aggregator.http_url)
    code, out, _ = run(capsys, "show", "req-42", "--format", "json")
    assert code == 0 and json.loads(out)["request_id"] == "req-42"


def test_basic_auth_from_user_or_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = "sha256:" + hashlib.sha256(b"s3cret").hexdigest()
    running = RunningAggregator(
        base_config(
            tmp_path,
            http={"basic_auth": {"username": "grafana", "password_hash": digest}},
            requests={"interval_s": 3600},
        )
    )
    try:
        fill(running)
        url = running.http_url
        code, _, err = run(capsys, "show", "req-42", "--url", url)
        assert code == 2 and "wants credentials: give --user NAME:PASSWORD" in err
        code, _, err = run(capsys, "show", "req-42", "--url", url, "--user", "grafana:guess")
        assert code == 2
        assert run(capsys, "show", "req-42", "--url", url, "--user", "grafana:s3cret", "--format", "json")[0] == 0
        with_userinfo = url.replace("http://", "http://grafana:s3cret@")
        code, out, _ = run(capsys, "show", "req-42", "--url", with_userinfo, "--format", "json")
        assert code == 0 and json.loads(out)["request_id"] == "req-42"
        monkeypatch.setenv("WATTMETER_AGGREGATOR_PASSWORD", "s3cret")
        assert run(capsys, "show", "req-42", "--url", url, "--user", "grafana")[0] == 0
    finally:
        running.stop()


def test_the_wattmeter_command_runs_it(aggregator: RunningAggregator) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "collector.cli", "requests", "show", "req-42", "--url", aggregator.http_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "41.2 J active, 1.3 kJ full" in done.stdout


# -- display


@pytest.mark.parametrize(
    ("joules", "shown"),
    [
        (0.0, "0 J"),
        (41.2, "41.2 J"),
        (1300.0, "1.3 kJ"),
        (999.6, "1 kJ"),
        (999.4, "999 J"),
        (0.3, "300 mJ"),
        (0.0004, "400 µJ"),
        (1.5e7, "15 MJ"),
        (-5.0, "-5 J"),
        (None, "-"),
        (float("nan"), "-"),
    ],
)
def test_si_prefixes(joules: float | None, shown: str) -> None:
    assert si(joules, "J") == shown
