"""The systemd units in deploy/systemd/, checked by Debian's systemd-analyze (verify, and the offline security
review) in a root laid out as install.sh lays a host; the hardening the issue asks for, directive by directive; the
config defaults against the units' directories; the RAPL access script on a fake powercap tree."""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from collector.aggregator.config import AggregatorConfig
from collector.config import DEFAULT_CONFIG_PATH, AgentConfig
from collector.store.urls import sqlite_path
from tests.fakes.powercap import typical_server

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
AGENT = SYSTEMD / "wattmeter-agent.service"
AGGREGATOR = SYSTEMD / "wattmeter-aggregator.service"
ENVIRON = SYSTEMD / "wattmeter-agent.service.d" / "environ.conf"
RAPL_ACCESS = SYSTEMD / "rapl-access"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")  # sysinit.target and the rest that verify loads with our units

# measured exposure (systemd 252, Debian 12), with a little room: a unit that loses hardening fails here
EXPOSURE_CEILING = {"wattmeter-agent.service": 1.6, "wattmeter-aggregator.service": 1.1}
EXPOSURE_CEILING_ENVIRON = 2.0
GOOD_ENOUGH = {"PERFECT", "SAFE", "OK"}

Directives = dict[str, list[str]]


def directives(unit: Path) -> Directives:
    """``Key=value`` lines of a unit file, each key with every value it was given, in order (no continuations)."""
    found: Directives = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("systemd-analyze")
    assert path, (
        "systemd-analyze missing: `make test` installs Debian's systemd package (scripts/install-test-tools.sh)"
    )
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def host_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the system's own units, ours where install.sh puts them, and the commands they run."""
    root = tmp_path_factory.mktemp("host")
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(AGENT, units)
    shutil.copy(AGGREGATOR, units)
    binary = root / "opt/wattmeter/bin/wattmeter"
    binary.parent.mkdir(parents=True)
    binary.write_text(f'#!/bin/sh\nexec {sys.executable} -m collector "$@"\n')
    binary.chmod(0o755)
    libexec = root / "usr/local/libexec/wattmeter"
    libexec.mkdir(parents=True)
    shutil.copy(RAPL_ACCESS, libexec)
    return root


def with_environ_dropin(host_root: Path) -> Path:
    dropin = host_root / "etc/systemd/system/wattmeter-agent.service.d"
    dropin.mkdir(exist_ok=True)
    shutil.copy(ENVIRON, dropin)
    return dropin / ENVIRON.name


def test_verify_passes_without_a_warning(host_root: Path) -> None:
    result = systemd_analyze("verify", f"--root={host_root}", AGENT.name, AGGREGATOR.name)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""  # verify only warns about a bad value: none allowed


def test_verify_passes_with_the_environ_dropin(host_root: Path) -> None:
    dropin = with_environ_dropin(host_root)
    try:
        result = systemd_analyze("verify", f"--root={host_root}", AGENT.name)
        assert result.returncode == 0 and result.stderr == "", result.stderr
    finally:
        dropin.unlink()


def test_verify_would_catch_a_bad_unit(host_root: Path, tmp_path: Path) -> None:
    """The checks above can fail: a misspelt value, and a command that is not there."""
    units = host_root / "etc/systemd/system"
    broken = units / "wattmeter-broken.service"
    broken.write_text(AGGREGATOR.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictest"))
    missing = units / "wattmeter-missing.service"
    missing.write_text(AGGREGATOR.read_text().replace("/opt/wattmeter/bin/", "/opt/nowhere/bin/"))
    try:
        result = systemd_analyze("verify", f"--root={host_root}", broken.name)
        assert "Failed to parse protect system value" in result.stderr
        result = systemd_analyze("verify", f"--root={host_root}", missing.name)
        assert result.returncode != 0 and "/opt/nowhere/bin/wattmeter is not executable" in result.stderr
    finally:
        broken.unlink()
        missing.unlink()


def exposure(host_root: Path, unit: str) -> tuple[float, str]:
    result = systemd_analyze("security", "--offline=yes", f"--root={host_root}", unit)
    assert result.returncode == 0, result.stderr
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1)), match.group(2)


@pytest.mark.parametrize("unit", sorted(EXPOSURE_CEILING))
def test_security_exposure_is_ok_or_better(host_root: Path, unit: str) -> None:
    level, verdict = exposure(host_root, unit)
    assert verdict in GOOD_ENOUGH
    assert level <= EXPOSURE_CEILING[unit]


def test_the_environ_dropin_costs_exposure_and_stays_ok(host_root: Path) -> None:
    plain, _ = exposure(host_root, AGENT.name)
    dropin = with_environ_dropin(host_root)
    try:
        level, verdict = exposure(host_root, AGENT.name)
    finally:
        dropin.unlink()
    assert plain < level <= EXPOSURE_CEILING_ENVIRON and verdict in GOOD_ENOUGH


HARDENING = {
    "Type": ["notify"],
    "WatchdogSec": ["30"],
    "DynamicUser": ["yes"],
    "StateDirectory": ["wattmeter"],
    "ProtectSystem": ["strict"],
    "ProtectHome": ["yes"],
    "PrivateTmp": ["yes"],
    "NoNewPrivileges": ["yes"],
    "CapabilityBoundingSet": [""],
    "AmbientCapabilities": [""],
    "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    "DevicePolicy": ["closed"],
}


@pytest.mark.parametrize("unit", [AGENT, AGGREGATOR], ids=["agent", "aggregator"])
def test_units_carry_the_hardening(unit: Path) -> None:
    found = directives(unit)
    for key, values in HARDENING.items():
        assert found.get(key) == values, key
    assert found["SystemCallFilter"][0] == "@system-service"
    assert found["MemoryMax"] and found["Restart"] == ["on-failure"]


def test_the_agent_reaches_gpus_and_rapl_and_nothing_more() -> None:
    found = directives(AGENT)
    assert found["SupplementaryGroups"] == ["powercap"]
    assert found["RuntimeDirectory"] == ["wattmeter"]
    assert found["ExecStartPre"] == ["+/usr/local/libexec/wattmeter/rapl-access"]  # `+`: root for this step only
    allowed = found["DeviceAllow"]
    # the GPUs' major is "nvidia" in /proc/devices since driver 550.40, "nvidia-frontend" before: both must be allowed
    for device in (
        "/dev/nvidiactl rw",
        "char-nvidia rw",
        "char-nvidia-frontend rw",
        "/dev/nvidia-uvm rw",
        "char-nvidia-caps r",
    ):
        assert device in allowed
    assert "ProtectProc" not in found  # the workload scanner reads every process's /proc/<pid>/stat
    dropin = directives(ENVIRON)
    assert dropin["CapabilityBoundingSet"] == ["CAP_SYS_PTRACE"] == dropin["AmbientCapabilities"]


def test_config_defaults_match_the_units_directories() -> None:
    agent, aggregator = directives(AGENT), directives(AGGREGATOR)
    runtime = Path("/run") / agent["RuntimeDirectory"][0]
    state = Path("/var/lib") / agent["StateDirectory"][0]
    assert aggregator["StateDirectory"] == agent["StateDirectory"]
    assert agent["User"] == aggregator["User"]  # one dynamic user: both may share /var/lib/wattmeter on one host
    config = AgentConfig()
    assert config.api.socket.parent == runtime
    assert config.stream.spool_dir.parent == state
    database = Path(sqlite_path(AggregatorConfig.model_construct().storage.url))
    assert database.parent == state
    assert agent["ExecStart"] == [f"/opt/wattmeter/bin/wattmeter agent --config {DEFAULT_CONFIG_PATH}"]
    assert aggregator["ExecStart"] == [
        "/opt/wattmeter/bin/wattmeter aggregator --config /etc/wattmeter/aggregator.toml"
    ]


def run_rapl_access(powercap: Path, group: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WATTMETER_RAPL_GROUP": group}
    return subprocess.run([str(RAPL_ACCESS), str(powercap)], capture_output=True, text=True, timeout=30, env=env)


def test_rapl_access_gives_the_group_read_access_and_everyone_else_none(tmp_path: Path) -> None:
    tree = typical_server(tmp_path, packages=2)
    energy = [zone.path / "energy_uj" for zone in tree.zones.values()]
    for path in energy:
        path.chmod(0o444)  # as before CVE-2020-8694: world-readable
    energy[0].chmod(0o466)  # and one with write bits that must not survive for the group or others
    untouched = {p: p.stat().st_mode for zone in tree.zones.values() for p in zone.path.iterdir() if p not in energy}
    group = grp.getgrgid(os.getgid()).gr_name  # one this user may chgrp to, root or not
    result = run_rapl_access(tree.class_dir, group)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"rapl-access: {len(energy)} energy_uj files readable by group {group}"
    for path in energy:
        info = path.stat()
        assert info.st_gid == os.getgid()
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0o040, path  # group: read only; others: nothing
    assert stat.S_IMODE(energy[0].stat().st_mode) == 0o440
    assert {p: p.stat().st_mode for p in untouched} == untouched
    again = run_rapl_access(tree.class_dir, group)  # every start runs it: idempotent
    assert again.returncode == 0 and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0o040 for p in energy)


def test_rapl_access_without_rapl_or_group(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    nothing = run_rapl_access(tmp_path, group)
    assert nothing.returncode == 0 and "no RAPL zones" in nothing.stdout
    missing = run_rapl_access(typical_server(tmp_path / "t", packages=1).class_dir, "no-such-group-wattmeter")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "rapl-access: no group 'no-such-group-wattmeter': create it with 'groupadd --system no-such-group-wattmeter' "
        "(deploy/install.sh does)"
    )
