"""Review of ``wattmeter demo``: a bad --data-dir, and a signal at the very start (no child is started for nothing
and the temp dir goes). In-process: each fails before any child runs."""

from __future__ import annotations

import io
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from collector.demo import orchestrate
from collector.demo.orchestrate import DemoOptions, run_demo
from tests.fakes.ports import free_port
from tests.test_demo import processes_mentioning


def options(**extra: Any) -> DemoOptions:
    ports = [free_port() for _ in range(3)]
    return DemoOptions(
        agent_listen=f"127.0.0.1:{ports[0]}",
        grpc_listen=f"127.0.0.1:{ports[1]}",
        http_listen=f"127.0.0.1:{ports[2]}",
        **extra,
    )


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_a_data_dir_that_cannot_be_made_is_one_line_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    file = tmp_path / "taken"
    file.write_text("not a directory")
    data_dir = file if where == "a-file" else file / "data"
    out = io.StringIO()
    code = run_demo(options(data_dir=data_dir, duration_s=1.0), out=out, live=False)
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert "--data-dir" in err and str(data_dir) in err
    assert processes_mentioning(str(tmp_path)) == []
    assert file.read_text() == "not a directory"


def test_a_signal_while_the_demo_sets_up_starts_nothing_and_removes_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT right after the temp dir is made (Demo's set-up, before the demo's own handlers were installed: a
    KeyboardInterrupt left the temp dir behind)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real = orchestrate.Telemetry

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(orchestrate, "Telemetry", interrupted)
    before = signal.getsignal(signal.SIGINT)
    try:
        code: int | None = run_demo(options(), out=io.StringIO(), live=False)
    except KeyboardInterrupt:
        code = None
    assert signal.getsignal(signal.SIGINT) == before
    assert processes_mentioning(str(tmp_path)) == []
    assert [p.name for p in tmp_path.iterdir()] == []  # the temp dir is gone
    assert code == 0


@pytest.mark.parametrize("after_children", [1, 2])
def test_sigterm_during_start_up_leaves_no_process_and_no_temp_dir(tmp_path: Path, after_children: int) -> None:
    """SIGTERM once the aggregator (1) or the agent too (2) has been started, before everything runs."""
    import time

    from tests.test_demo import demo_process

    with demo_process(tmp_path) as proc:
        deadline = time.monotonic() + 60
        while len(processes_mentioning(str(tmp_path), besides=proc.pid)) < after_children:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert processes_mentioning(str(tmp_path)) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("wattmeter-demo-")]
