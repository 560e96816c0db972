"""Who this host is on the wire: its name, its machine id and the id of its current boot."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MACHINE_ID = Path("etc/machine-id")
BOOT_ID = Path("proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class HostId:
    hostname: str
    machine_id: str  # /etc/machine-id: stable across reboots and renames
    boot_id: str  # changes at every boot: energy counters may restart with it


def _read_id(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        log.info("%s: %s; batches carry no such id", path, exc.strerror or exc)
        return ""


def read_host_id(hostname: str = "", root: Path = Path("/")) -> HostId:
    """This host's identity; ``hostname`` overrides ``socket.gethostname()``, ``root`` moves /etc and /proc (tests)."""
    return HostId(hostname or socket.gethostname(), _read_id(root / MACHINE_ID), _read_id(root / BOOT_ID))
