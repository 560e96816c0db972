"""CPU package, core, uncore, DRAM and psys energy from the RAPL powercap sysfs tree.

Intel and AMD (since Linux 5.8) expose the same tree: ``/sys/class/powercap/intel-rapl:N`` for package N and
``intel-rapl:N:M`` for its subzones, each a symlink into ``/sys/devices/virtual/powercap/...`` with ``name``,
``energy_uj`` and ``max_energy_range_uj``. ``energy_uj`` wraps at ``max_energy_range_uj``; one wrap between two
reads is folded in, several cannot be seen, so reads must come faster than ``max_energy_range_uj / max power``
(about 262 kJ / 0.5 kW = 524 s on a typical server package at full load; the agent warns past half of that).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from collector.config import AgentConfig
from collector.counters import EnergyCounter
from collector.errors import PermissionDeniedError, SourceError, SourceUnavailable
from collector.readings import DeviceInfo, DeviceKind, DeviceReading, EnergyMethod
from collector.sources.base import Source, register_source

log = logging.getLogger(__name__)

_ZONE_DIR = re.compile(r"^(intel-rapl(?:-mmio)?):(\d+)(?::(\d+))?$")
# Assumed ceiling where the zone states no max power: well above any server CPU package today.
_FALLBACK_MAX_POWER_W = 1000.0

PERMISSION_FIX = (
    "RAPL energy_uj is readable by root only since CVE-2020-8694. Fix: run the agent as root, or give a group "
    "read access and run the agent in it: deploy/systemd/wattmeter-agent.service does this at each start (its "
    "ExecStartPre=+ runs deploy/systemd/rapl-access: chgrp powercap + chmod g+r on energy_uj), or install the "
    "udev rule in deploy/udev/"
)


def read_int(path: Path) -> int:
    """Read one integer attribute; a fresh open each time, so a vanished zone shows up as an error."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    return int(data)


@dataclass
class _Zone:
    path: Path
    info: DeviceInfo
    counter: EnergyCounter
    safe_interval_s: float
    energy_path: str = ""
    fd: int | None = None
    checked_ns: int = 0
    last_mono_ns: int | None = None
    last_energy_j: float = 0.0
    power_w: float | None = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RaplSource(Source):
    name = "rapl"

    def __init__(
        self, root: Path = Path("/sys/class/powercap"), interval_s: float = 0.1, recheck_interval_s: float = 1.0
    ) -> None:
        self.root = Path(root)
        self.interval_s = interval_s
        # energy_uj stays open and is re-read with pread; every recheck_interval_s the path is checked too,
        # since an unlinked file keeps answering through an open descriptor
        self._recheck_ns = int(recheck_interval_s * 1e9)
        self._zones: list[_Zone] = []
        self._errors: dict[str, str] = {}
        self._warned_slow: set[str] = set()

    def open(self) -> None:
        self.close()  # a retried open must not leak the descriptors of the last try
        if not self.root.is_dir():
            raise SourceUnavailable(f"no powercap tree at {self.root} (no RAPL on this host, or not mounted)")
        try:
            self._zones = self._discover()
        except OSError as exc:
            raise SourceError(f"cannot list RAPL zones under {self.root}: {exc.strerror or exc}") from None
        if not self._zones:
            raise SourceUnavailable(f"no intel-rapl zones under {self.root}")
        try:
            for zone in self._zones:  # one read now, so a permission problem is one clear error at start
                self._read_zone(zone, time.monotonic_ns())
        except SourceError:
            self.close()
            raise

    def _discover(self) -> list[_Zone]:
        entries = []
        for entry in os.listdir(self.root):
            match = _ZONE_DIR.match(entry)
            if match:
                interface, top, sub = match.group(1), int(match.group(2)), match.group(3)
                entries.append((interface != "intel-rapl", top, -1 if sub is None else int(sub), interface, entry))
        entries.sort()  # MSR zones before MMIO ones, each package before its subzones
        package_names: dict[tuple[str, int], str] = {}
        seen: set[tuple[str, str]] = set()
        zones = []
        for _, top, sub, interface, entry in entries:
            path = (self.root / entry).resolve()  # follow class/powercap symlinks into devices/virtual/...
            try:
                zone_name = (path / "name").read_text().strip()
                max_range = read_int(path / "max_energy_range_uj")
            except (OSError, ValueError) as exc:
                log.warning("RAPL zone %s skipped: no readable name or max_energy_range_uj (%s)", path, exc)
                continue
            if sub < 0:
                package_names[(interface, top)] = zone_name
            domain = zone_name.split("-")[0] if zone_name.startswith("package-") else zone_name
            top_name = package_names.get((interface, top), "")
            if domain == "psys":  # the whole platform, not a socket
                package, device_id = "", "psys"
            else:
                package = top_name.split("-", 1)[1] if top_name.startswith("package-") else str(top)
                if domain == "package":
                    device_id = f"cpu{package}"
                elif domain == "dram":
                    device_id = f"dram{package}"
                else:
                    device_id = f"cpu{package}-{domain}"
            if (package, domain) in seen:
                # intel-rapl-mmio duplicates the MSR interface's package zone on some Intel CPUs: the same
                # energy twice, which a sum over packages would count twice
                log.info("RAPL zone %s skipped: same package %r and domain %r as another zone", entry, package, domain)
                continue
            seen.add((package, domain))
            max_power_w = _zone_max_power_w(path)
            info = DeviceInfo(
                device_id=device_id,
                kind=DeviceKind.DRAM if domain == "dram" else DeviceKind.CPU,
                source=self.name,
                vendor=_cpu_vendor(),
                model=f"RAPL {zone_name}",
                index=top,
                package=package,
                domain=domain,
                method=EnergyMethod.COUNTER,
                attributes=(("zone", entry),),
            )
            zones.append(
                _Zone(
                    path=path,
                    info=info,
                    counter=EnergyCounter(scale_j=1e-6, max_range=max_range),
                    safe_interval_s=max_range * 1e-6 / max_power_w,
                    energy_path=str(path / "energy_uj"),
                )
            )
        return zones

    def devices(self) -> Sequence[DeviceInfo]:
        return [zone.info for zone in self._zones]

    def read(self) -> Sequence[DeviceReading]:
        readings = []
        errors: dict[str, str] = {}
        for zone in self._zones:
            mono_ns = time.monotonic_ns()
            try:
                readings.append(self._read_zone(zone, mono_ns))
            except PermissionDeniedError:
                raise
            except SourceError as exc:
                errors[zone.info.device_id] = str(exc)
        for device_id, reason in errors.items():
            if device_id not in self._errors:
                log.warning("RAPL zone %s stopped answering: %s", device_id, reason)
        self._errors = errors
        if errors and not readings:
            raise SourceError(f"every RAPL zone failed: {'; '.join(errors.values())}")
        return readings

    def _read_zone(self, zone: _Zone, mono_ns: int) -> DeviceReading:
        energy_path = zone.energy_path
        try:
            if zone.fd is None:
                zone.fd = os.open(energy_path, os.O_RDONLY)
                zone.checked_ns = mono_ns
                if zone.counter.started:  # back after an error: its new value is a new baseline
                    zone.counter.rebase()
                    zone.last_mono_ns = None
            elif mono_ns - zone.checked_ns >= self._recheck_ns:
                zone.checked_ns = mono_ns
                os.stat(energy_path)
            raw = int(os.pread(zone.fd, 32, 0))
        except PermissionError:
            zone.close()
            raise PermissionDeniedError(f"cannot read {energy_path}: permission denied. {PERMISSION_FIX}") from None
        except OSError as exc:
            zone.close()
            reason = "zone vanished" if exc.errno in (errno.ENOENT, errno.ENODEV) else exc.strerror
            raise SourceError(f"{energy_path}: {reason}") from None
        except ValueError:
            raise SourceError(f"{energy_path}: not an integer") from None
        zone.counter.update(raw)
        energy_j = zone.counter.total_j
        if zone.last_mono_ns is not None and mono_ns > zone.last_mono_ns:
            elapsed_s = (mono_ns - zone.last_mono_ns) / 1e9
            zone.power_w = (energy_j - zone.last_energy_j) / elapsed_s
            if elapsed_s > zone.safe_interval_s / 2 and zone.info.device_id not in self._warned_slow:
                self._warned_slow.add(zone.info.device_id)
                log.warning(
                    "RAPL zone %s read %.0f s after the last read; past %.0f s a counter wrap can be missed",
                    zone.info.device_id,
                    elapsed_s,
                    zone.safe_interval_s,
                )
        zone.last_mono_ns = mono_ns
        zone.last_energy_j = energy_j
        return DeviceReading(zone.info.device_id, energy_j, zone.power_w, mono_ns, time.time_ns())

    def device_errors(self) -> dict[str, str]:
        return dict(self._errors)

    def close(self) -> None:
        for zone in self._zones:
            zone.close()


def _zone_max_power_w(path: Path) -> float:
    try:
        max_power_w = read_int(path / "constraint_0_max_power_uw") / 1e6
    except (OSError, ValueError):
        return _FALLBACK_MAX_POWER_W
    return max_power_w if max_power_w > 0 else _FALLBACK_MAX_POWER_W


@functools.cache
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    return {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(vendor, vendor)
    except OSError:
        pass
    return "unknown"


@register_source("rapl")
def _build(config: AgentConfig) -> Source | None:
    rapl = config.sources.rapl
    return RaplSource(rapl.root, rapl.interval_s) if rapl.enabled else None
