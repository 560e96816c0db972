"""``wattmeter report`` with training steps and workload labels in a real SQLite store: J per step, steps/s
against mean power by power quartile, and workloads labelled flexible=true moved by the shift advisor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from collector.cli import main
from collector.report.data import is_flexible_label
from collector.store import open_store
from collector.store.base import StepSeriesRow, WorkloadLabelsRow
from tests.store.builders import INFERENCE, TRAINING, batch

HOUR_NS = 3600 * 10**9
MINUTE_NS = 60 * 10**9
DAY0 = 1_800_000_000 * 10**9 - (1_800_000_000 * 10**9) % (86400 * 10**9)  # a UTC midnight (2027-01-15)
PROFILE = [100.0] * 6 + [300.0] * 12 + [500.0] * 6
KJ = 1000.0
BATCH_JOB = ("nightly-eval", "unknown", "")
HOURS = 8  # training hours, 10:00-17:00: hour h uses 100 kJ x (h + 1) and does 1,000 steps in 10 minutes


def iso(t_ns: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t_ns // 10**9, tz=timezone.utc).isoformat()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    url = f"sqlite:///{tmp_path / 'aggregator.db'}"
    store = open_store(url)
    store.migrate()
    sequence = 0
    for h in range(HOURS):
        sequence += 1
        start = DAY0 + (10 + h) * HOUR_NS
        stored = batch(sequence, start_ns=start, workloads=(TRAINING,), rollup_j=100 * KJ * (h + 1))
        # cumulative, one point a minute for 10 minutes: 100 steps each
        times = tuple(start + m * MINUTE_NS + 10**9 for m in range(10))
        counts = tuple(h * 1000 + (m + 1) * 100 for m in range(10))
        team = (WorkloadLabelsRow(*TRAINING, {"team": "nlp"}, start),)
        store.write_batch(dataclasses.replace(stored, steps=(StepSeriesRow(*TRAINING, times, counts),),
                                              workload_labels=team))  # fmt: skip
    sequence += 1
    serve = batch(sequence, start_ns=DAY0 + 20 * HOUR_NS, workloads=(INFERENCE, BATCH_JOB), rollup_j=50 * KJ)
    labels = (
        WorkloadLabelsRow(*INFERENCE, {"flexible": " TRUE "}, DAY0 + 20 * HOUR_NS),
        WorkloadLabelsRow(*BATCH_JOB, {"flexible": "no"}, DAY0 + 20 * HOUR_NS),
    )
    store.write_batch(dataclasses.replace(serve, workload_labels=labels))
    store.close()
    path = tmp_path / "aggregator.toml"
    path.write_text(f'[storage]\nurl = "{url}"\n\n[carbon]\nhourly_g_per_kwh = {PROFILE}\n')
    return path


def report(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> str:
    window = ["--since", iso(DAY0), "--until", iso(DAY0 + 86400 * 10**9)]
    assert main(["report", "--config", str(config), *window, *args]) == 0
    return capsys.readouterr().out


def test_joules_per_step_and_steps_per_second_against_mean_power(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(report(capsys, config, "--format", "json"))
    (row,) = data["step_power"]
    assert (row["host"], row["workload"], row["phase"], row["job"]) == ("host-1", *TRAINING)
    energy_j = sum(100 * KJ * (h + 1) for h in range(HOURS))  # 3.6 MJ
    assert row["steps"] == HOURS * 1000
    assert row["stepping_s"] == HOURS * 600
    assert row["joules_per_step"] == pytest.approx(energy_j / 8000)  # 450 J
    assert row["gpu_joules_per_step"] == pytest.approx(energy_j / 8000)  # all of it on gpu0
    assert row["mean_w"] == pytest.approx(energy_j / (HOURS * 600))  # 750 W while stepping
    assert row["steps_per_s"] == pytest.approx(8000 / (HOURS * 600))
    # quartiles of the hours by mean power: 2 hours each, the same steps, so J per step grows with power
    bins = row["bins"]
    assert [b["quartile"] for b in bins] == [1, 2, 3, 4]
    assert [b["hours"] for b in bins] == [2, 2, 2, 2]
    assert [b["mean_w"] for b in bins] == pytest.approx([300 * KJ / 1200, 700 * KJ / 1200, 1100 * KJ / 1200,
                                                         1500 * KJ / 1200])  # fmt: skip
    assert [b["joules_per_step"] for b in bins] == pytest.approx([150.0, 350.0, 550.0, 750.0])
    assert [b["steps_per_s"] for b in bins] == pytest.approx([2000 / 1200] * 4)
    assert data["training_power"] == []  # the training workload has steps: it is in step_power instead
    assert data["step_note"] == ""


def test_a_workload_labelled_flexible_is_moved_by_the_advisor(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(report(capsys, config, "--format", "json"))
    flexible = {f["workload"]: f["reasons"] for f in data["flexible"]}
    assert flexible == {"train-llm": ["phase training"], "serve-llm": ["label flexible= TRUE "]}
    shifted = {w["workload"] for w in data["shift"]["workloads"]}
    assert "host-1/serve-llm/inference/job-2" in shifted  # inference, moved for its label
    assert not any("nightly-eval" in name for name in shifted)  # flexible=no
    # --flexible still adds by name
    data = json.loads(report(capsys, config, "--format", "json", "--flexible", "^nightly"))
    assert {f["workload"]: f["reasons"] for f in data["flexible"]}["nightly-eval"] == ["--flexible ^nightly"]


def test_text_and_html_show_steps_and_flexible_workloads(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = report(capsys, config)
    assert "host-1/train-llm (job job-1)" in text
    assert "450.00" in text  # J/step
    assert "power quartile 4 (2 h)" in text
    assert "host-1/serve-llm/inference/job-2: label flexible= TRUE " in text
    out = tmp_path / "report.html"
    report(capsys, config, "--format", "html", "--output", str(out))
    html = out.read_text()
    assert "450.00" in html and "label flexible= TRUE " in html


def test_no_steps_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    store = open_store(url)  # the aggregator's doing: a report creates no store
    store.migrate()
    store.close()
    assert main(["report", "--storage", url, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step_power"] == [] and "no training steps" in data["step_note"]
    assert data["flexible"] == []


@pytest.mark.parametrize(
    ("value", "flexible"),
    [("true", True), ("True", True), ("1", True), ("YES", True), (" yes ", True), ("no", False), ("", False)],
)
def test_flexible_label_values(value: str, flexible: bool) -> None:
    assert is_flexible_label({"flexible": value}) is flexible
    assert is_flexible_label({"other": "true"}) is False
