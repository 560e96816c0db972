"""deploy/install.sh run for real under a temporary root (``--root``): the real groupadd/groupdel (``--prefix``) and
``systemctl --root`` do their work there, never on this machine."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"
# backups that groupadd and groupdel write beside what they change, as on every Debian host
SHADOW_BACKUPS = {"etc/group-", "etc/gshadow-"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="groupadd --prefix needs root (CI runs as root)")

Tree = dict[str, tuple[int, bytes]]


def make_root(root: Path, with_binary: bool = True) -> Path:
    """A host's bare bones: the account files the shadow tools edit, and the venv's wattmeter where units expect it."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    for name, line in {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n",
        "shadow": "root:*:19000:0:99999:7:::\n",
        "group": "root:x:0:\nadm:x:4:\n",
        "gshadow": "root:*::\nadm:*::\n",
    }.items():
        (etc / name).write_text(line)
        shutil.copy(etc / name, etc / f"{name}-")
    if with_binary:
        binary = root / "opt" / "wattmeter" / "bin" / "wattmeter"
        binary.parent.mkdir(parents=True)
        binary.write_text(f'#!/bin/sh\nexec {sys.executable} -m collector "$@"\n')
        binary.chmod(0o755)
    data = root / "var" / "lib" / "wattmeter" / "spool"
    data.mkdir(parents=True)
    (data / "segment-0").write_bytes(b"spooled batches")
    return root


def snapshot(root: Path) -> Tree:
    """Every path under ``root``: its mode and content (a link's target)."""
    tree: Tree = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = os.readlink(path).encode()
        elif stat.S_ISREG(info.st_mode):
            content = path.read_bytes()
        else:
            content = b""
        tree[str(path.relative_to(root))] = (info.st_mode, content)
    return tree


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args], capture_output=True, text=True, timeout=60
    )


def without_backups(tree: Tree) -> Tree:
    return {path: entry for path, entry in tree.items() if path not in SHADOW_BACKUPS}


def test_install_twice_then_uninstall_leaves_the_root_as_it_was(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    before = snapshot(root)
    first = install(root, "agent", "aggregator", "--environ", "--udev")
    assert first.returncode == 0, first.stderr
    installed = snapshot(root)
    expected = {
        "etc/systemd/system/wattmeter-agent.service": 0o644,
        "etc/systemd/system/wattmeter-aggregator.service": 0o644,
        "etc/systemd/system/wattmeter-agent.service.d/environ.conf": 0o644,
        "etc/udev/rules.d/99-wattmeter-powercap.rules": 0o644,
        "usr/local/libexec/wattmeter/rapl-access": 0o755,
        "usr/local/share/doc/wattmeter/README.md": 0o644,
        "etc/wattmeter/agent.toml": 0o644,
        "etc/wattmeter/aggregator.toml": 0o644,
    }
    for path, mode in expected.items():
        assert stat.S_IMODE(installed[path][0]) == mode, path
    assert (
        installed["etc/systemd/system/wattmeter-agent.service"][1]
        == (REPO / "deploy/systemd/wattmeter-agent.service").read_bytes()
    )
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "wattmeter-agent.service") == "/etc/systemd/system/wattmeter-agent.service"
    assert os.readlink(wants / "wattmeter-aggregator.service") == "/etc/systemd/system/wattmeter-aggregator.service"
    groups = (root / "etc/group").read_text().splitlines()
    assert any(line.startswith("powercap:x:") for line in groups)
    assert any(line.startswith("powercap:") for line in (root / "etc/gshadow").read_text().splitlines())
    assert "created group powercap" in first.stdout

    second = install(root, "agent", "aggregator", "--environ", "--udev")
    assert second.returncode == 0, second.stderr
    assert snapshot(root) == installed  # idempotent: nothing changed, nothing added
    assert "group powercap exists" in second.stdout and "exists: kept as it is" in second.stdout

    removed = install(root, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert without_backups(snapshot(root)) == without_backups(before)  # the spool's data included
    assert (root / "var/lib/wattmeter/spool/segment-0").read_bytes() == b"spooled batches"
    again = install(root, "--uninstall")
    assert again.returncode == 0 and "nothing to uninstall" in again.stdout


def test_an_existing_group_is_neither_created_nor_removed(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    with (root / "etc/group").open("a") as group:
        group.write("powercap:x:990:\n")
    with (root / "etc/gshadow").open("a") as gshadow:
        gshadow.write("powercap:!::\n")
    assert install(root).returncode == 0
    assert install(root, "--uninstall").returncode == 0
    assert "powercap:x:990:" in (root / "etc/group").read_text().splitlines()


def test_a_config_is_never_replaced_and_a_changed_one_is_kept(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    config = root / "etc/wattmeter/aggregator.toml"
    assert install(root, "aggregator").returncode == 0
    assert config.read_bytes() == (REPO / "deploy/aggregator.example.toml").read_bytes()
    config.write_text(config.read_text() + "# tuned by the operator\n")
    tuned = config.read_bytes()
    assert install(root, "aggregator").returncode == 0
    assert config.read_bytes() == tuned
    result = install(root, "--uninstall")
    assert result.returncode == 0
    assert "kept /etc/wattmeter/aggregator.toml: it was changed since the install" in result.stdout
    assert config.read_bytes() == tuned
    assert not (root / "etc/systemd/system/wattmeter-aggregator.service").exists()


def test_installed_configs_pass_config_check_and_let_every_user_register(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    assert install(root, "agent", "aggregator").returncode == 0
    binary = root / "opt/wattmeter/bin/wattmeter"
    for args in (["etc/wattmeter/agent.toml"], ["--aggregator", "etc/wattmeter/aggregator.toml"]):
        check = subprocess.run(
            [str(binary), "config", "check", *(str(root / a) if a.startswith("etc") else a for a in args)],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("WATTMETER_")},
        )
        assert check.returncode == 0, check.stdout + check.stderr
    installed = (root / "etc/wattmeter/agent.toml").read_text().splitlines()
    example = (REPO / "deploy/agent.example.toml").read_text().splitlines()
    changed = [(mine, theirs) for mine, theirs in zip(installed, example, strict=True) if mine != theirs]
    # the only change: the socket's owner is a dynamic user that no workload shares
    assert [(mine.split("#")[0].strip(), theirs) for mine, theirs in changed] == [
        ("socket_mode = 0o666", "socket_mode = 0o660")
    ]


def test_no_binary_is_a_clear_error_that_changes_nothing(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", with_binary=False)
    before = snapshot(root)
    result = install(root)
    assert result.returncode == 1
    assert "opt/wattmeter/bin/wattmeter: the units run Wattmeter from a venv there" in result.stderr
    assert "python3 -m venv" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(root) == before


def test_dry_run_changes_nothing_and_says_what_it_would_do(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    before = snapshot(root)
    result = install(root, "--dry-run", "agent")
    assert result.returncode == 0, result.stderr
    assert snapshot(root) == before
    assert f"would run: groupadd --system --prefix {root} powercap" in result.stdout
    assert f"would run: systemctl --root={root} enable wattmeter-agent.service" in result.stdout
    assert install(root, "agent").returncode == 0
    installed = snapshot(root)
    assert install(root, "--uninstall", "--dry-run").returncode == 0
    assert snapshot(root) == installed


def test_bad_arguments_are_refused_with_a_message(tmp_path: Path) -> None:
    result = install(make_root(tmp_path / "root"), "--frobnicate")
    assert result.returncode == 2 and "unknown argument '--frobnicate'" in result.stderr
    assert (
        "Usage: deploy/install.sh"
        in subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=10).stdout
    )
