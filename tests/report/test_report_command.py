"""``wattmeter report`` end to end on a real SQLite store filled through the store interface."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from collector.cli import main
from collector.report.html import SECTIONS
from collector.store import Store, open_store
from collector.store.base import RequestResult
from collector.store.migrations import LATEST_VERSION
from tests.store.builders import INFERENCE, TRAINING, batch

HOUR_NS = 3600 * 10**9
DAY0 = 1_800_000_000 * 10**9 - (1_800_000_000 * 10**9) % (86400 * 10**9)  # a UTC midnight (2027-01-15)
# night 0-5 at 100 g, day 300 g, evening 18-23 at 500 g
PROFILE = [100.0] * 6 + [300.0] * 12 + [500.0] * 6
KJ = 1000.0


def iso(t_ns: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t_ns // 10**9, tz=timezone.utc).isoformat()


def fill(store: Store) -> None:
    """Two days: training at 18:00 and 19:00 (evening, 500 g) each day, 360 kJ an hour; inference at noon, 180 kJ.
    The day before: training only, 360 kJ at 18:00. Each batch's device rollup equals its workload's."""
    sequence = 0

    def put(t_ns: int, workload: tuple[str, str, str], joules: float) -> None:
        nonlocal sequence
        sequence += 1
        store.write_batch(batch(sequence, start_ns=t_ns, workloads=(workload,), rollup_j=joules))

    put(DAY0 - 86400 * 10**9 + 18 * HOUR_NS, TRAINING, 360 * KJ)
    for day in range(2):
        base = DAY0 + day * 86400 * 10**9
        put(base + 12 * HOUR_NS, INFERENCE, 180 * KJ)
        put(base + 18 * HOUR_NS, TRAINING, 360 * KJ)
        put(base + 19 * HOUR_NS, TRAINING, 360 * KJ)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[str, Path]:
    url = f"sqlite:///{tmp_path / 'aggregator.db'}"
    store = open_store(url)
    store.migrate()
    fill(store)
    store.close()
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f'[storage]\nurl = "{url}"\n\n[carbon]\nhourly_g_per_kwh = {PROFILE}\nprice_per_kwh = 0.25\ncurrency = "EUR"\n'
    )
    return url, config


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["report", *args]) == 0
    return capsys.readouterr().out


def test_json_report_holds_hand_computed_energy_co2_cost_trend_and_shift(
    setup: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, config = setup
    window = ["--since", iso(DAY0), "--until", iso(DAY0 + 2 * 86400 * 10**9)]
    data = json.loads(run(capsys, "--config", str(config), *window, "--format", "json"))
    kwh = (2 * 180 + 4 * 360) * KJ / 3.6e6  # 0.5 kWh
    kg = (2 * 180 * KJ * 300 + 4 * 360 * KJ * 500) / 3.6e6 / 1000
    assert data["total"]["kwh"] == pytest.approx(kwh)
    assert data["total"]["kg"] == pytest.approx(kg)
    assert data["total"]["cost"] == pytest.approx(kwh * 0.25)
    assert data["previous_total"]["kwh"] == pytest.approx(360 * KJ / 3.6e6)
    groups = {g["name"]: g for g in data["groups"]}
    assert groups["train-llm"]["now"]["kwh"] == pytest.approx(4 * 360 * KJ / 3.6e6)
    assert groups["train-llm"]["previous"]["kwh"] == pytest.approx(360 * KJ / 3.6e6)
    assert groups["serve-llm"]["previous"] is None
    phases = {g["name"]: g["now"]["kwh"] for g in data["phases"]}
    assert phases == pytest.approx({"training": 0.4, "inference": 0.1})
    assert [w["name"] for w in data["top_workloads"]] == ["train-llm", "serve-llm"]
    # the advisor moves each evening's two training hours to the 100 g night: 0.4 kWh x 400 g saved
    shift = data["shift"]
    assert shift["reason"] == ""
    assert shift["saved_kg"] == pytest.approx(0.4 * 0.4)
    assert shift["saved_cost"] == pytest.approx(0.0)  # a constant price: moving saves no money
    assert len(shift["workloads"][0]["moves"]) == 4
    assert "no request data" in data["models_note"]


def test_html_report_opens_and_holds_every_section(setup: tuple[str, Path], tmp_path: Path) -> None:
    _, config = setup
    out = tmp_path / "report.html"
    args = ["--config", str(config), "--since", iso(DAY0), "--until", iso(DAY0 + 2 * 86400 * 10**9)]
    assert main(["report", *args, "--format", "html", "--output", str(out)]) == 0

    class Sections(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.ids: list[str] = []
            self.tags: set[str] = set()
            self.links: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags.add(tag)
            values = dict(attrs)
            if tag == "section" and values.get("id"):
                self.ids.append(str(values["id"]))
            self.links += [str(v) for k, v in attrs if k in ("src", "href")]

    parser = Sections()
    parser.feed(out.read_text())
    parser.close()
    assert parser.ids == list(SECTIONS)
    assert {"svg", "rect", "polyline", "table"} <= parser.tags
    assert parser.links == []  # self-contained: nothing to fetch


def test_text_report_by_host_and_the_constant_default(
    setup: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = setup
    args = ["--since", iso(DAY0), "--until", iso(DAY0 + 2 * 86400 * 10**9), "--by", "host"]
    text = run(capsys, "--storage", url, "--config", "/dev/null", *args)
    assert "constant 400 g/kWh (the default" in text
    assert "host-1" in text
    assert "no saving possible: intensity is constant" in text


def test_bad_arguments_and_storage_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--since", "last tuesday", "--config", "/dev/null"]) == 2
    assert "neither a duration" in capsys.readouterr().err
    garbage = tmp_path / "x.db"
    garbage.write_bytes(b"not a database" * 100)
    code = main(["report", "--storage", f"sqlite:///{garbage}", "--config", "/dev/null"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("wattmeter report: storage:") and "Traceback" not in err


def test_requests_give_j_per_request_and_power_quartiles(
    setup: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, config = setup
    store = open_store(url)
    start = DAY0 + 12 * HOUR_NS
    results = [
        RequestResult(
            f"r{i}",
            "final",
            model="llama",
            hosts=("host-1",),
            start_ns=start + i * 10**9,
            end_ns=start + (i + 1) * 10**9,  # 1 s each: mean power = J
            output_tokens=10,
            active_j=100.0 + 10 * i,
            gpu_j=100.0 + 10 * i,
            cpu_j=0.0,
            dram_j=0.0,
            full_j=100.0 + 10 * i,
            spans=1,
        )
        for i in range(8)
    ]
    try:
        store.write_request_results(results)
    except NotImplementedError:
        pytest.skip("this store does not keep request results yet (issue 5)")
    finally:
        store.close()
    data = json.loads(
        run(
            capsys,
            "--config",
            str(config),
            "--since",
            iso(DAY0),
            "--until",
            iso(DAY0 + 86400 * 10**9),
            "--format",
            "json",
        )
    )
    (model,) = data["models"]
    assert model["requests"] == 8
    assert model["joules_per_output_token"] == pytest.approx(sum(100 + 10 * i for i in range(8)) / 80)
    assert model["kg"] == pytest.approx(sum(100 + 10 * i for i in range(8)) / 3.6e6 * 300 / 1000)
    bins = data["power_bins"]
    assert [b["mean_w"] for b in bins] == pytest.approx([105.0, 125.0, 145.0, 165.0])


def test_a_missing_sqlite_file_is_one_line_and_nothing_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nonexistent" / "x.db"
    assert main(["report", "--storage", f"sqlite:///{missing}", "--config", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"wattmeter report: no SQLite database at {missing}:")
    assert not missing.parent.exists()


def test_a_file_without_a_schema_is_refused_and_left_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()  # an empty file is an empty SQLite database
    assert main(["report", "--storage", f"sqlite:///{empty}", "--config", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no wattmeter data" in err
    assert empty.stat().st_size == 0


def _execute(url: str, sql: str, *params: object) -> None:
    if url.startswith("sqlite"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as lite, lite:
            lite.execute(sql, params)
        return
    import psycopg

    with psycopg.connect(url) as pg:
        pg.execute(sql.replace("?", "%s"), params)


def _stored_version(url: str) -> int:
    store = open_store(url)
    try:
        return store.schema_version()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("older", f"schema is version {LATEST_VERSION - 1}, older than this wattmeter's {LATEST_VERSION}: start"),
        ("newer", f"schema is version {LATEST_VERSION + 1}, newer than this wattmeter's {LATEST_VERSION}: upgrade"),
    ],
)
def test_a_schema_of_another_version_is_one_line_and_not_migrated(
    store_url: str, change: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(store_url)
    store.migrate()
    store.close()
    if change == "older":
        _execute(store_url, "DELETE FROM schema_version WHERE version = ?", LATEST_VERSION)
        expected = LATEST_VERSION - 1
    else:
        _execute(
            store_url,
            "INSERT INTO schema_version (version, description, applied_ns) VALUES (?, 'future', 0)",
            LATEST_VERSION + 1,
        )
        expected = LATEST_VERSION + 1
    assert main(["report", "--storage", store_url, "--config", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wattmeter report: the store's") and message in err
    assert _stored_version(store_url) == expected  # the report migrated nothing


def test_a_bad_flexible_regex_is_one_line(setup: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, config = setup
    assert main(["report", "--config", str(config), "--flexible", "train", "--flexible", "("]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("wattmeter report: --flexible '(' is not a regular expression (missing ), unterminated")


def _request(i: int, model: str, start_ns: int, joules: float) -> RequestResult:
    return RequestResult(
        f"{model}-{i}",
        "final",
        model=model,
        hosts=("host-1",),
        start_ns=start_ns,
        end_ns=start_ns + 10**9,
        output_tokens=10,
        active_j=joules,
        gpu_j=joules,
        cpu_j=0.0,
        dram_j=0.0,
        full_j=joules,
        spans=1,
    )


def test_model_co2_and_cost_count_every_request_beyond_the_read_cap(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("collector.report.data.MAX_REQUESTS", 5)
    store = open_store(store_url)
    store.migrate()
    # llama: 12 requests at noon (300 g) and 6 at 18:00 (500 g); mistral: 3 at 01:00 (100 g); one pending, not counted
    results = [_request(i, "llama", DAY0 + 12 * HOUR_NS + i * 10**9, 1000.0) for i in range(12)]
    results += [_request(12 + i, "llama", DAY0 + 18 * HOUR_NS + i * 10**9, 2000.0) for i in range(6)]
    results += [_request(i, "mistral", DAY0 + 1 * HOUR_NS + i * 10**9, 500.0) for i in range(3)]
    results.append(dataclasses.replace(_request(99, "llama", DAY0 + 13 * HOUR_NS, 1e9), status="pending"))
    try:
        store.write_request_results(results)
        hours = store.request_hours(DAY0, DAY0 + 86400 * 10**9)
    finally:
        store.close()
    assert [(h.model, (h.hour_ns - DAY0) // HOUR_NS, h.count, h.energy_j) for h in hours] == [
        ("llama", 12, 12, 12000.0),
        ("llama", 18, 6, 12000.0),
        ("mistral", 1, 3, 1500.0),
    ]
    config = tmp_path / "carbon.toml"
    config.write_text(f"[carbon]\nhourly_g_per_kwh = {PROFILE}\nprice_per_kwh = 0.25\n")
    window = ["--since", iso(DAY0), "--until", iso(DAY0 + 86400 * 10**9)]
    data = json.loads(run(capsys, "--storage", store_url, "--config", str(config), *window, "--format", "json"))
    models = {m["model"]: m for m in data["models"]}
    assert models["llama"]["requests"] == 18
    assert models["llama"]["kg"] == pytest.approx((12000 * 300 + 12000 * 500) / 3.6e6 / 1000)
    assert models["llama"]["cost"] == pytest.approx(24000 / 3.6e6 * 0.25)
    assert models["mistral"]["kg"] == pytest.approx(1500 * 100 / 3.6e6 / 1000)
    assert data["models_note"] == ""
    assert data["power_note"] == "the newest 5 requests only"  # the power quartiles alone read requests one by one


def test_by_model_and_by_phase_show_the_trend_against_the_previous_period(
    setup: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, config = setup
    store = open_store(url)
    try:  # llama: 2 kJ the day before (the previous period of a one-day window), 6 kJ on the day; mistral: new
        store.write_request_results(
            [
                _request(0, "llama", DAY0 - 12 * HOUR_NS, 2000.0),
                _request(1, "llama", DAY0 + 12 * HOUR_NS, 6000.0),
                _request(2, "mistral", DAY0 + 12 * HOUR_NS, 1000.0),
            ]
        )
    finally:
        store.close()
    window = ["--config", str(config), "--since", iso(DAY0), "--until", iso(DAY0 + 86400 * 10**9)]
    data = json.loads(run(capsys, *window, "--by", "model", "--format", "json"))
    groups = {g["name"]: g for g in data["groups"]}
    assert groups["llama"]["now"]["kwh"] == pytest.approx(6000 / 3.6e6)
    assert groups["llama"]["previous"]["kwh"] == pytest.approx(2000 / 3.6e6)
    assert groups["llama"]["previous"]["kg"] == pytest.approx(2000 / 3.6e6 * 300 / 1000)  # noon the day before
    assert groups["mistral"]["previous"] is None
    text = run(capsys, *window, "--by", "model")
    assert "+200.0%" in text  # llama: 6 kJ against 2 kJ

    data = json.loads(run(capsys, *window, "--by", "phase", "--format", "json"))
    groups = {g["name"]: g for g in data["groups"]}
    assert groups["training"]["now"]["kwh"] == pytest.approx(2 * 360 * KJ / 3.6e6)
    assert groups["training"]["previous"]["kwh"] == pytest.approx(360 * KJ / 3.6e6)
    assert groups["inference"]["now"]["kwh"] == pytest.approx(180 * KJ / 3.6e6)
    assert groups["inference"]["previous"] is None
