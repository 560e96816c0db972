from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.errors import SourceError, SourceUnavailable
from collector.readings import DeviceKind
from collector.sources.rapl import RaplSource
from tests.fakes.nobody import open_up, run_as_nobody
from tests.fakes.powercap import FakePowercap, typical_server


@pytest.fixture
def tree(tmp_path: Path) -> FakePowercap:
    return typical_server(tmp_path, packages=2)


def opened(tree: FakePowercap, recheck_interval_s: float = 0.0) -> RaplSource:
    source = RaplSource(tree.class_dir, interval_s=0.1, recheck_interval_s=recheck_interval_s)
    source.open()
    return source


def energies(source: RaplSource) -> dict[str, float]:
    return {r.device_id: r.energy_j for r in source.read()}


def test_discovers_zones_and_subzones_through_symlinks(tree: FakePowercap) -> None:
    assert (tree.class_dir / "intel-rapl:0").is_symlink()
    source = opened(tree)
    found = {(d.device_id, d.package, d.domain, d.kind) for d in source.devices()}
    assert found == {
        ("cpu0", "0", "package", DeviceKind.CPU),
        ("cpu0-core", "0", "core", DeviceKind.CPU),
        ("cpu0-uncore", "0", "uncore", DeviceKind.CPU),
        ("dram0", "0", "dram", DeviceKind.DRAM),
        ("cpu1", "1", "package", DeviceKind.CPU),
        ("cpu1-core", "1", "core", DeviceKind.CPU),
        ("cpu1-uncore", "1", "uncore", DeviceKind.CPU),
        ("dram1", "1", "dram", DeviceKind.DRAM),
        ("psys", "", "psys", DeviceKind.CPU),
    }


def test_energy_in_joules_and_power_from_deltas(tree: FakePowercap) -> None:
    source = opened(tree)
    package0 = tree.zones["0"]
    first = energies(source)
    assert first["cpu0"] == pytest.approx(10.0)  # 10,000,000 uJ
    tree.set_energy(package0, package0.energy_uj + 25_000_000)
    readings = {r.device_id: r for r in source.read()}
    assert readings["cpu0"].energy_j == pytest.approx(35.0)
    assert readings["cpu0"].power_w is not None and readings["cpu0"].power_w > 0
    assert readings["cpu1"].energy_j == pytest.approx(20.0)


def test_wraparound_through_max_energy_range(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path)
    zone = tree.add_zone("0", "package-0", energy_uj=900_000, max_energy_range_uj=1_000_000)
    source = opened(tree)
    start = energies(source)["cpu0"]
    tree.set_energy(zone, 100_000)  # passed 1,000,000 and wrapped: +0.2 J
    assert energies(source)["cpu0"] - start == pytest.approx(0.2)
    tree.set_energy(zone, 999_999)
    tree_total = energies(source)["cpu0"] - start
    assert tree_total == pytest.approx(0.2 + 0.899_999)


def test_warns_when_reads_fall_behind_the_safe_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = FakePowercap(tmp_path)
    tree.add_zone("0", "package-0", energy_uj=0, max_energy_range_uj=1_000_000)  # 1 J range: 1 ms at 1 kW
    source = opened(tree)
    clock = iter(range(0, 10**12, 10**9))  # each read 1 s after the last
    monkeypatch.setattr("collector.sources.rapl.time.monotonic_ns", lambda: next(clock))
    with caplog.at_level(logging.WARNING):
        source.read()
        source.read()
    assert any("counter wrap can be missed" in r.message for r in caplog.records)


def test_zone_vanishing_keeps_the_others(tree: FakePowercap) -> None:
    source = opened(tree)
    source.read()
    tree.remove_zone(tree.zones["1:2"])
    readings = energies(source)
    assert "dram1" not in readings
    assert "cpu0" in readings and "dram0" in readings
    assert "dram1" in source.device_errors()
    assert "vanished" in source.device_errors()["dram1"]


def test_vanished_zone_is_noticed_at_the_next_recheck(tree: FakePowercap, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [10**12]
    monkeypatch.setattr("collector.sources.rapl.time.monotonic_ns", lambda: now[0])
    source = opened(tree, recheck_interval_s=1.0)
    tree.remove_zone(tree.zones["0:2"])
    now[0] += 500_000_000
    assert "dram0" in energies(source)  # the open descriptor still answers until the path is checked
    now[0] += 600_000_000
    assert "dram0" not in energies(source)
    assert "vanished" in source.device_errors()["dram0"]


@pytest.mark.parametrize("comes_back_at_uj", [3_000_000, 10])  # above and below where it left
def test_zone_that_comes_back_adds_only_what_it_counts_after(tree: FakePowercap, comes_back_at_uj: int) -> None:
    source = opened(tree)
    zone = tree.zones["0:2"]
    before = energies(source)["dram0"]
    tree.remove_zone(zone)
    assert "dram0" not in energies(source)
    zone = tree.add_zone("0:2", "dram", energy_uj=comes_back_at_uj)  # a module reload restarts the counter
    assert energies(source)["dram0"] == pytest.approx(before)  # no wrap, no jump
    tree.set_energy(zone, comes_back_at_uj + 500_000)
    assert energies(source)["dram0"] == pytest.approx(before + 0.5)


def test_mmio_zone_duplicating_the_msr_package_is_skipped(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path)
    tree.add_zone("0", "package-0", energy_uj=1_000_000)
    tree.add_zone("0:0", "core", energy_uj=500_000)
    mmio_dir = tree.devices_dir.parent / "intel-rapl-mmio" / "intel-rapl-mmio:0"
    mmio_dir.mkdir(parents=True)
    (mmio_dir / "name").write_text("package-0\n")
    (mmio_dir / "max_energy_range_uj").write_text("262143328850\n")
    (mmio_dir / "energy_uj").write_text("1000123\n")
    (tree.class_dir / "intel-rapl-mmio:0").symlink_to(mmio_dir)
    source = opened(tree)
    labels = [(d.package, d.domain) for d in source.devices()]
    assert labels == [("0", "package"), ("0", "core")]


def test_every_zone_vanishing_is_a_source_error(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path)
    zone = tree.add_zone("0", "package-0")
    source = opened(tree)
    tree.remove_zone(zone)
    with pytest.raises(SourceError, match="every RAPL zone failed"):
        source.read()


def test_no_tree_means_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable):
        RaplSource(tmp_path / "missing").open()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceUnavailable):
        RaplSource(empty).open()


def test_garbage_in_energy_uj_is_an_error_not_a_crash(tree: FakePowercap) -> None:
    source = opened(tree)
    (tree.zones["0"].path / "energy_uj").write_text("garbage\n")
    source.read()
    assert "not an integer" in source.device_errors()["cpu0"]


@pytest.fixture
def world_traversable_tree() -> Iterator[FakePowercap]:
    root = Path(tempfile.mkdtemp(prefix="wattmeter-rapl-"))
    os.chmod(root, 0o755)
    try:
        tree = typical_server(root, packages=1)
        open_up(root, 0o644)
        for zone in tree.zones.values():
            # as the kernel ships it since CVE-2020-8694; a non-root owner could still read 0400, so 0000 then
            os.chmod(zone.path / "energy_uj", 0o400 if os.geteuid() == 0 else 0o000)
        yield tree
    finally:
        shutil.rmtree(root)


PERMISSION_PROBE = """
import sys
from collector.errors import PermissionDeniedError
from collector.sources.rapl import RaplSource
drop()
try:
    RaplSource(sys.argv[1]).open()
except PermissionDeniedError as exc:
    print("DENIED", exc)
else:
    print("READ")
"""


def test_permission_denied_names_the_fix(world_traversable_tree: FakePowercap) -> None:
    result = run_as_nobody(PERMISSION_PROBE, str(world_traversable_tree.class_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("DENIED"), result.stdout
    assert "CVE-2020-8694" in result.stdout
    assert "powercap" in result.stdout  # the group fix
