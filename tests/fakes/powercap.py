"""Fake RAPL powercap trees laid out like a real host's sysfs, for tests and benchmarks.

Layout (as on Linux): ``<root>/sys/class/powercap/intel-rapl:N[:M]`` are symlinks into
``<root>/sys/devices/virtual/powercap/intel-rapl/intel-rapl:N[/intel-rapl:N:M]``, each zone holding ``name``,
``energy_uj``, ``max_energy_range_uj`` and ``enabled``. Point the agent at ``class_dir`` and node_exporter's
``--path.sysfs`` at ``sysfs``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_RANGE_UJ = 262_143_328_850


@dataclass
class FakeZone:
    zone_id: str  # "0" for intel-rapl:0, "0:1" for intel-rapl:0:1
    name: str  # package-0, core, uncore, dram, psys
    energy_uj: int = 0
    max_energy_range_uj: int = DEFAULT_MAX_RANGE_UJ
    path: Path = field(default=Path())

    @property
    def entry(self) -> str:
        return f"intel-rapl:{self.zone_id}"


class FakePowercap:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.sysfs = self.root / "sys"
        self.class_dir = self.sysfs / "class" / "powercap"
        self.devices_dir = self.sysfs / "devices" / "virtual" / "powercap" / "intel-rapl"
        self.class_dir.mkdir(parents=True, exist_ok=True)
        self.devices_dir.mkdir(parents=True, exist_ok=True)
        (self.class_dir / "intel-rapl").symlink_to(os.path.relpath(self.devices_dir, self.class_dir))
        self.zones: dict[str, FakeZone] = {}

    def add_zone(
        self, zone_id: str, name: str, energy_uj: int = 0, max_energy_range_uj: int = DEFAULT_MAX_RANGE_UJ
    ) -> FakeZone:
        parts = zone_id.split(":")
        if len(parts) == 1:
            path = self.devices_dir / f"intel-rapl:{zone_id}"
        else:
            path = self.devices_dir / f"intel-rapl:{parts[0]}" / f"intel-rapl:{zone_id}"
        path.mkdir(parents=True, exist_ok=True)
        zone = FakeZone(zone_id, name, energy_uj, max_energy_range_uj, path)
        (path / "name").write_text(name + "\n")
        (path / "max_energy_range_uj").write_text(f"{max_energy_range_uj}\n")
        (path / "enabled").write_text("1\n")
        self.set_energy(zone, energy_uj)
        (self.class_dir / zone.entry).symlink_to(os.path.relpath(path, self.class_dir))
        self.zones[zone_id] = zone
        return zone

    def set_energy(self, zone: FakeZone, energy_uj: int) -> None:
        zone.energy_uj = energy_uj
        # rewrite in place (same inode), as a sysfs attribute changes under an open reader; overwrite, then cut the
        # tail, so that a reader in between never sees the empty file that truncating first would show it
        data = f"{energy_uj}\n".encode()
        fd = os.open(zone.path / "energy_uj", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)

    def remove_zone(self, zone: FakeZone) -> None:
        for child in zone.path.iterdir():
            if child.is_file():
                child.unlink()
        (self.class_dir / zone.entry).unlink()
        del self.zones[zone.zone_id]


def typical_server(root: Path, packages: int = 2, with_dram: bool = True) -> FakePowercap:
    """A two-socket server: package, core, uncore and dram per package, plus psys."""
    tree = FakePowercap(root)
    for pkg in range(packages):
        tree.add_zone(f"{pkg}", f"package-{pkg}", energy_uj=10_000_000 * (pkg + 1))
        tree.add_zone(f"{pkg}:0", "core", energy_uj=5_000_000)
        tree.add_zone(f"{pkg}:1", "uncore", energy_uj=1_000_000)
        if with_dram:
            tree.add_zone(f"{pkg}:2", "dram", energy_uj=2_000_000)
    tree.add_zone(f"{packages}", "psys", energy_uj=50_000_000)
    return tree
