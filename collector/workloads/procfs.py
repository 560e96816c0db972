"""A cheap scan of ``/proc``: one read of ``/proc/<pid>/stat`` per process per scan, and the things that never
change during a process's life (command line, selected environment, cgroup) read once and cached.

Units: ``starttime`` and CPU times are in clock ticks (``os.sysconf("SC_CLK_TCK")``, 100 on Linux) since boot,
as the kernel writes them in ``stat`` (proc(5)).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from collector.errors import SourceUnavailable

#: The only environment variables kept from ``/proc/<pid>/environ``; the rest may hold secrets.
ENVIRON_KEYS: tuple[str, ...] = ("WATTMETER_WORKLOAD", "WATTMETER_PHASE", "WATTMETER_JOB", "SLURM_JOB_ID")
_ENVIRON_PREFIXES: tuple[bytes, ...] = tuple(key.encode() + b"=" for key in ENVIRON_KEYS)

_READ_CHUNK = 8192

# Kubernetes pod cgroups: "kubepods-burstable-pod<uid, '-' as '_'>.slice" with the systemd driver,
# "pod<uid>" with cgroupfs. Static (mirror) pods have a 32-hex md5 UID without dashes.
_POD = re.compile(r"(?:^|-)pod([0-9a-fA-F][0-9a-fA-F_-]{30,34}[0-9a-fA-F])(?:\.slice)?$")
# Container cgroups: a bare 64-hex id (cgroupfs, docker v1) or a runtime's systemd scope. "crio-conmon-<id>" is
# the monitor process, not the container, so it is not matched.
_CONTAINER = re.compile(r"^(?:(?:cri-containerd|docker|crio|libpod)-)?([0-9a-f]{64})(?:\.scope)?$")
_SLURM_JOB = re.compile(r"^job_(\d+)$")


class ProcessSample(NamedTuple):
    """One process as one scan saw it. A NamedTuple: thousands are built per scan.

    ``starttime`` (stat field 22) and ``cpu_ticks`` (utime + stime, fields 14 and 15) are in clock ticks;
    (pid, starttime) names a process for its whole life, a pid alone does not (pids are reused).
    """

    pid: int
    ppid: int
    starttime: int
    comm: str
    cpu_ticks: int


@dataclass(frozen=True)
class CgroupInfo:
    """What a process's cgroup paths say about where it runs; empty strings where they say nothing."""

    pod_uid: str = ""
    container_id: str = ""
    unit: str = ""
    slurm_job: str = ""


@dataclass(frozen=True)
class ProcessStatic:
    """What does not change while a process lives, read once per (pid, starttime).

    ``cmdline`` is argv (empty for kernel threads and zombies); ``exe`` the base name of argv[0], or ``comm``
    when there is no argv. ``environ`` holds only the ``ENVIRON_KEYS`` that are set.
    """

    pid: int
    starttime: int
    cmdline: tuple[str, ...]
    exe: str
    environ: Mapping[str, str] = field(default_factory=dict, hash=False)
    pod_uid: str = ""
    container_id: str = ""
    unit: str = ""
    slurm_job: str = ""


def parse_stat(data: bytes, pid: int) -> ProcessSample | None:
    """Parse one ``/proc/<pid>/stat``; None when it is not a stat line of ``pid``.

    ``comm`` may hold spaces and parentheses (``(my (weird) proc)``), so the fields after it start at the last ')'.
    """
    head, paren, tail = data.rpartition(b")")
    if not paren:
        return None
    pid_text, open_paren, comm = head.partition(b"(")
    if not open_paren:
        return None
    fields = tail.split()
    if len(fields) < 20:
        return None
    try:
        if int(pid_text) != pid:
            return None
        # fields[0] is stat field 3 (state), so stat field n is fields[n - 3]
        return ProcessSample(
            pid,
            int(fields[1]),
            int(fields[19]),
            comm.decode("utf-8", "replace"),
            int(fields[11]) + int(fields[12]),
        )
    except ValueError:
        return None


def parse_cgroup(text: str) -> tuple[CgroupInfo, int]:
    """Parse ``/proc/<pid>/cgroup``: v2 (``0::/path``) and v1 (``N:controllers:/path``) lines.

    Returns the info and the number of malformed lines skipped. The v2 path is looked at first, then the v1 paths
    in file order; each field comes from the first path that has it.
    """
    v2: list[str] = []
    v1: list[str] = []
    bad = 0
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].startswith("/"):
            bad += 1
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2.append(path)
        else:
            v1.append(path)
    pod_uid = container_id = unit = slurm_job = ""
    for path in v2 + v1:
        components = [part for part in path.split("/") if part]
        kubernetes = "kubepods" in path
        for part in components:
            if not pod_uid and kubernetes and (match := _POD.search(part)):
                pod_uid = match.group(1).replace("_", "-")
            if not slurm_job and (match := _SLURM_JOB.match(part)):
                slurm_job = match.group(1)
        for part in reversed(components):
            if not container_id and (match := _CONTAINER.match(part)):
                container_id = match.group(1)
            if not unit and part.endswith(".service"):
                unit = part
    return CgroupInfo(pod_uid, container_id, unit, slurm_job), bad


def parse_environ(data: bytes) -> dict[str, str]:
    """Keep only the ``ENVIRON_KEYS`` of a NUL-separated environment block."""
    kept: dict[str, str] = {}
    for entry in data.split(b"\0"):
        if entry.startswith(_ENVIRON_PREFIXES):
            key, _, value = entry.partition(b"=")
            kept[key.decode()] = value.decode("utf-8", "replace")
    return kept


def parse_cmdline(data: bytes) -> tuple[str, ...]:
    """argv from a NUL-separated ``cmdline`` (the kernel ends it with a NUL; setproctitle may not)."""
    if not data:
        return ()
    if data.endswith(b"\0"):
        data = data[:-1]
    return tuple(arg.decode("utf-8", "replace") for arg in data.split(b"\0"))


def executable_name(cmdline: tuple[str, ...], comm: str) -> str:
    """Base name of argv[0]; ``comm`` when there is none."""
    if not cmdline or not cmdline[0]:
        return comm
    first = cmdline[0]
    if len(cmdline) == 1 and " " in first:
        # setproctitle-style: the whole command line rewritten into argv[0] ("nginx: worker process")
        first = first.split(" ", 1)[0].rstrip(":")
    return os.path.basename(first.rstrip("/")) or comm


def _read_fd(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, _READ_CHUNK)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


class ProcessTable:
    """Scans a proc tree (``/proc``, or a fake one in tests) and caches per-process static facts.

    Nothing here raises for one process: a process that exits mid-scan, or a file that holds garbage, is skipped
    and counted in ``errors``. Only a proc root that cannot be listed at all raises (``SourceUnavailable``).
    """

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self.proc_root = Path(proc_root)
        self.errors = 0
        self._root = str(self.proc_root)
        self._statics: dict[tuple[int, int], ProcessStatic | None] = {}

    def scan(self) -> dict[int, ProcessSample]:
        """Every process now, by pid. Static facts of processes gone (or pids reused) are dropped from the cache."""
        samples: dict[int, ProcessSample] = {}
        root = self._root
        try:
            entries = os.scandir(root)
        except OSError as exc:
            raise SourceUnavailable(f"{root}: cannot list processes ({exc.strerror}); is proc mounted?") from None
        with entries:
            names = [entry.name for entry in entries if entry.name.isdigit()]
        for name in names:
            pid = int(name)
            try:
                fd = os.open(f"{root}/{name}/stat", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = os.read(fd, _READ_CHUNK)
                finally:
                    os.close(fd)
            except OSError:  # exited since the listing: ENOENT, or ESRCH while it is being reaped
                self.errors += 1
                continue
            sample = parse_stat(data, pid)
            if sample is None:
                self.errors += 1
                continue
            samples[pid] = sample
        stale = [
            key
            for key in self._statics
            if (sample := samples.get(key[0])) is None or sample.starttime != key[1]  # gone, or the pid reused
        ]
        for key in stale:
            del self._statics[key]
        return samples

    def static(self, pid: int, starttime: int) -> ProcessStatic | None:
        """The static facts of process (pid, starttime), read on first use and cached until it is gone.

        None when the process has exited or the pid now belongs to another process. An unreadable environment
        (another user's process while the agent is not root) leaves ``environ`` empty and counts one error.
        """
        key = (pid, starttime)
        try:
            return self._statics[key]
        except KeyError:
            pass
        static = self._read_static(pid, starttime)
        self._statics[key] = static
        return static

    def _read_static(self, pid: int, starttime: int) -> ProcessStatic | None:
        # every file is opened relative to one directory descriptor: if the pid is reused after it is opened,
        # reads through it fail (ESRCH) instead of returning the new process's files
        try:
            dir_fd = os.open(f"{self._root}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self.errors += 1
            return None
        try:
            try:
                sample = parse_stat(_read_at(dir_fd, "stat"), pid)
                if sample is None or sample.starttime != starttime:
                    return None
                cmdline = parse_cmdline(_read_at(dir_fd, "cmdline"))
                cgroup_text = _read_at(dir_fd, "cgroup").decode("utf-8", "replace")
            except OSError:  # exited meanwhile (ENOENT, ESRCH), or hidden from us (EACCES)
                self.errors += 1
                return None
            try:
                environ = parse_environ(_read_at(dir_fd, "environ"))
            except OSError:  # EACCES: another user's process and the agent is not root
                environ = {}
                self.errors += 1
        finally:
            os.close(dir_fd)
        cgroup, bad_lines = parse_cgroup(cgroup_text)
        self.errors += bad_lines
        return ProcessStatic(
            pid=pid,
            starttime=starttime,
            cmdline=cmdline,
            exe=executable_name(cmdline, sample.comm),
            environ=environ,
            pod_uid=cgroup.pod_uid,
            container_id=cgroup.container_id,
            unit=cgroup.unit,
            slurm_job=cgroup.slurm_job,
        )

    def cached(self) -> int:
        """How many (pid, starttime) entries the static cache holds."""
        return len(self._statics)
