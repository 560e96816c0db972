"""The ``wattmeter`` command line, run in-process through ``main()`` and once as ``python -m collector``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from collector import __version__
from collector.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]

GOOD_FILE = """
log_level = "warning"
[prometheus]
listen = "127.0.0.1:9911"
[sources.nvml]
interval_s = 0.5
[sources.simulated]
gpus = 2
"""

BAD_FILE = """
[prometheus]
listne = "127.0.0.1:9911"
[sources.nvml]
interval_s = "fast"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("WATTMETER_"):
            monkeypatch.delenv(name, raising=False)


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WATTMETER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return env


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- config check -----------------------------------------------------------------------------------------


def test_config_check_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD_FILE)
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: ok"
    assert err == ""


def test_config_check_reports_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD_FILE)
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert any(line.startswith(f"{path}: prometheus.listne: unknown key") for line in lines)
    assert any(line.startswith(f"{path}: sources.nvml.interval_s:") and "'fast'" in line for line in lines)
    assert "Traceback" not in err


def test_config_check_malformed_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[prometheus\n")
    assert main(["config", "check", str(path)]) == 2
    _, err = capsys.readouterr()
    assert f"{path}: not valid TOML" in err
    assert "Traceback" not in err


def test_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    assert main(["config", "check", str(path)]) == 2
    _, err = capsys.readouterr()
    assert str(path) in err
    assert "no such file" in err


def test_config_check_does_not_blame_the_file_for_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD_FILE)
    monkeypatch.setenv("WATTMETER_SOURCES__RAPL__INTERVAL_S", "-1")
    rc = main(["config", "check", str(path)])
    _, err = capsys.readouterr()
    # `config check` checks the file alone: a valid file passes whatever the environment holds
    assert rc == 0 and err == "", err


# --- config show ------------------------------------------------------------------------------------------


def test_config_show_reflects_file_and_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD_FILE)
    monkeypatch.setenv("WATTMETER_SOURCES__NVML__INTERVAL_S", "0.2")
    monkeypatch.setenv("WATTMETER_PROMETHEUS__LISTEN", "127.0.0.1:9922")
    assert main(["config", "show", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    data = tomllib.loads(out)
    assert data["log_level"] == "warning"  # file
    assert data["sources"]["simulated"]["gpus"] == 2  # file
    assert data["sources"]["nvml"]["interval_s"] == 0.2  # env beats file
    assert data["prometheus"]["listen"] == "127.0.0.1:9922"  # env beats file
    assert data["sources"]["nvml"]["slow_interval_s"] == 1.0  # default
    assert data["sources"]["cpu_model"]["enabled"] == "auto"


def test_config_show_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD_FILE)
    assert main(["config", "show", "--config", str(path), "--format", "json"]) == 0
    out, _ = capsys.readouterr()
    data = json.loads(out)
    assert data["log_level"] == "warning"
    assert data["prometheus"]["listen"] == "127.0.0.1:9911"
    assert data["prometheus"]["tls_cert"] is None
    assert data["sources"]["nvml"]["interval_s"] == 0.5
    assert data["sources"]["rapl"]["root"] == "/sys/class/powercap"


def test_config_show_uses_wattmeter_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD_FILE)
    monkeypatch.setenv("WATTMETER_CONFIG", str(path))
    assert main(["config", "show", "--format", "json"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out)["prometheus"]["listen"] == "127.0.0.1:9911"


def test_config_show_bad_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD_FILE)
    assert main(["config", "show", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: prometheus.listne: unknown key" in err
    assert f"{path}: sources.nvml.interval_s:" in err
    assert "Traceback" not in err


# --- hash-password ----------------------------------------------------------------------------------------


def test_hash_password_sha256(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("correct horse\n"))
    assert main(["hash-password", "--scheme", "sha256"]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == "sha256:" + hashlib.sha256(b"correct horse").hexdigest()


def test_hash_password_bcrypt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("correct horse\n"))
    assert main(["hash-password", "--scheme", "bcrypt"]) == 0
    out, _ = capsys.readouterr()
    hashed = out.strip().encode()
    assert hashed.startswith(b"$2b$")
    assert bcrypt.checkpw(b"correct horse", hashed)
    assert not bcrypt.checkpw(b"wrong horse", hashed)


def test_hash_password_default_scheme_is_bcrypt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert main(["hash-password"]) == 0
    out, _ = capsys.readouterr()
    assert bcrypt.checkpw(b"pw", out.strip().encode())


def test_hash_password_output_is_a_valid_config_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for scheme in ("sha256", "bcrypt"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
        assert main(["hash-password", "--scheme", scheme]) == 0
        hashed = capsys.readouterr().out.strip()
        path = write(tmp_path, f'[prometheus.basic_auth]\nusername = "u"\npassword_hash = "{hashed}"\n')
        assert main(["config", "check", str(path)]) == 0, capsys.readouterr().err
        capsys.readouterr()


def test_hash_password_empty(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["hash-password", "--scheme", "sha256"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "empty password" in err


# --- version, usage ---------------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"wattmeter {__version__}"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "collector", "version"],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wattmeter {__version__}"


def test_module_entry_point_config_check_exit_code(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_FILE)
    result = subprocess.run(
        [sys.executable, "-m", "collector", "config", "check", str(path)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{path}: prometheus.listne: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


# --- agent ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["badvalue", "127.0.0.1:99999", "127.0.0.1:port"])
def test_agent_bad_listen_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    empty = write(tmp_path, "")
    rc = main(["agent", "--config", str(empty), "--listen", listen, "--no-nvml", "--simulate-gpus", "1"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "prometheus.listen" in err
    assert listen in err
    assert "Traceback" not in err


def test_agent_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD_FILE)
    assert main(["agent", "--config", str(path), "--no-nvml"]) == 2
    _, err = capsys.readouterr()
    assert f"{path}: prometheus.listne: unknown key" in err


def test_agent_port_in_use_exits_1(tmp_path: Path) -> None:
    empty = write(tmp_path, "")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "collector",
            "agent",
            "--config",
            str(empty),
            "--listen",
            f"127.0.0.1:{port}",
            "--simulate-gpus",
            "1",
            "--no-nvml",
            "--rapl-root",
            str(tmp_path / "no-powercap-here"),
        ]
        try:
            result = subprocess.run(
                command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired as exc:  # the agent started serving instead of failing
            pytest.fail(f"agent did not exit on a port in use: {exc.stderr!r}")
    assert result.returncode == 1, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


# --- config check: the [carbon] CSV's rows ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ("2027-01-01T00:00Z,100\n2027-01-01T01:00Z,-5\n", "line 3: g_per_kwh is -5; it must be finite and 0 or more"),
        ("2027-01-01T00:00Z,100\n2027-01-01T01:00Z,100\n2027-01-01T04:00Z,100\n", "rows are not evenly spaced"),
    ],
)
@pytest.mark.parametrize("aggregator", [False, True])
def test_config_check_reads_the_carbon_csv_as_the_agent_does_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: str, problem: str, aggregator: bool
) -> None:
    from collector.carbon.config import CarbonConfig
    from collector.carbon.series import CarbonSeriesSource
    from collector.errors import ConfigError

    csv = tmp_path / "grid.csv"
    csv.write_text("timestamp,g_per_kwh\n" + rows)
    grpc = '[grpc]\nlisten = "127.0.0.1:50051"\n\n' if aggregator else ""
    path = write(tmp_path, f'{grpc}[carbon]\ncsv = "{csv}"\n')
    assert main(["config", "check", *(["--aggregator"] if aggregator else []), str(path)]) == 2
    out, err = capsys.readouterr()
    with pytest.raises(ConfigError) as at_start:  # what the agent and the aggregator refuse to start with
        CarbonSeriesSource(CarbonConfig(csv=csv))
    assert out == ""
    assert err.strip() == f"{path}: [carbon] csv: {at_start.value}"
    assert problem in err
    csv.write_text("timestamp,g_per_kwh\n2027-01-01T00:00Z,100\n2027-01-01T01:00Z,100\n")
    assert main(["config", "check", *(["--aggregator"] if aggregator else []), str(path)]) == 0
