"""A cheap scan of ``/proc``: one read of ``/proc/<pid>/stat`` per process per scan, and the things that never
change during a process's life (command line, selected environment, cgroup) read once and cached.

Each process's ``stat`` stays open between scans and is re-read with one ``pread`` (about a quarter of the cost of
an open, read and close). An open ``/proc/<pid>/stat`` belongs to the process, not to the pid: once the process is
reaped, reads fail with ``ESRCH``, so a reused pid is never read through the old descriptor; and a new process
under an old pid shows a new ``starttime``.

Units: ``starttime`` and CPU times are in clock ticks (``os.sysconf("SC_CLK_TCK")``, 100 on Linux) since boot,
as the kernel writes them in ``stat`` (proc(5)).
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from collector.errors import SourceUnavailable

#: The only environment variables kept from ``/proc/<pid>/environ``; the rest may hold secrets.
ENVIRON_KEYS: tuple[str, ...] = ("WATTMETER_WORKLOAD", "WATTMETER_PHASE", "WATTMETER_JOB", "SLURM_JOB_ID")
_ENVIRON_PREFIXES: tuple[bytes, ...] = tuple(key.encode() + b"=" for key in ENVIRON_KEYS)

_READ_CHUNK = 8192
#: ``stat``'s fields up to ``starttime`` (field 22) take at most about 530 bytes (a 64-byte comm, 20-digit numbers).
_STAT_READ = 1024
#: ``schedstat``: three decimal numbers (nanoseconds on the CPU, nanoseconds waiting for it, timeslices).
_SCHEDSTAT_READ = 96
# A process whose stat did not change for QUIET_AFTER scans is read once every QUIET_READ_EVERY scans.
QUIET_AFTER = 5
QUIET_READ_EVERY = 20
#: Scans between listings of the proc root when no process was created (a backstop for a stalled last pid).
LIST_EVERY = 30
#: File descriptors left free for everything else the agent opens (sockets, sysfs, NVML) when stat files are kept.
FD_HEADROOM = 256
#: Kept-open stat files at most, whatever the limit: each costs the kernel about 1 KiB.
MAX_CACHED_FDS = 32768

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
    comm: str = ""  # when read: a new comm with the same pid and starttime means an exec, and these are stale
    pod_uid: str = ""
    container_id: str = ""
    unit: str = ""
    slurm_job: str = ""


def threads_of(data: bytes) -> int:
    """The thread count of a ``/proc/<pid>/stat`` (field 20); 0 when it cannot be read from ``data``."""
    fields = data.rpartition(b")")[2].split(None, 18)
    try:
        return int(fields[17])
    except (IndexError, ValueError):
        return 0


def parse_stat(data: bytes, pid: int) -> ProcessSample | None:
    """Parse one ``/proc/<pid>/stat``; None when it is not a stat line of ``pid``.

    ``comm`` may hold spaces and parentheses (``(my (weird) proc)``), so the fields after it start at the last ')'.
    Only the fields up to ``starttime`` are split off: the thirty after it are never looked at.
    """
    head, paren, tail = data.rpartition(b")")
    if not paren:
        return None
    pid_text, open_paren, comm = head.partition(b"(")
    if not open_paren:
        return None
    fields = tail.split(None, 20)
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


_fd_limit_raised = False


def raise_fd_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to the hard limit (once); returns the soft limit now."""
    global _fd_limit_raised
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not _fd_limit_raised:
        _fd_limit_raised = True
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, MAX_CACHED_FDS + FD_HEADROOM)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (OSError, ValueError):
                pass
    return soft


class _Open:
    """A process's ``stat`` kept open between scans, with what it held at the last read; and its ``schedstat``
    where that could be kept open too (``sched_fd`` -1 otherwise)."""

    __slots__ = ("bucket", "data", "fd", "quiet", "sample", "sched", "sched_fd", "single")

    def __init__(self, fd: int, data: bytes, sample: ProcessSample, sched_fd: int = -1, sched: bytes = b"") -> None:
        self.fd = fd
        self.data = data
        self.sample = sample
        self.sched_fd = sched_fd
        # schedstat at the last read (the main thread's time on the CPU, time waiting for it, timeslices); it
        # speaks for the whole process only while that is its one thread (``single``, from stat)
        self.sched = sched
        self.single = threads_of(data) == 1
        self.quiet = 0  # reads in a row that found the same bytes
        self.bucket = -1  # the quiet bucket it sits in; -1: read every scan


class ProcessTable:
    """Scans a proc tree (``/proc``, or a fake one in tests) and caches per-process static facts.

    Nothing here raises for one process: a process that exits mid-scan, or a file that holds garbage, is skipped
    and counted in ``errors``. Only a proc root that cannot be listed at all raises (``SourceUnavailable``).

    ``stat`` files the kernel generates (``st_size`` 0) stay open between scans, each with its process's
    ``schedstat``, up to ``max_open`` descriptors in all (default: the soft ``RLIMIT_NOFILE``, raised to the
    hard limit, less ``FD_HEADROOM``, and at most ``MAX_CACHED_FDS``); past that, and for regular files (a fake
    tree), each scan opens, reads and closes ``stat``. ``close()`` releases them.

    A scan is incremental, so a host of thousands of sleeping processes costs little:

    - the proc root is listed only when a process was created since the last listing (the last pid in
      ``loadavg`` moved), and at least every ``LIST_EVERY`` scans; between listings, processes that exit are
      noticed when their kept-open ``stat`` fails to read;
    - a process whose ``stat`` stayed the same ``QUIET_AFTER`` reads in a row is read once every
      ``QUIET_READ_EVERY`` scans (in turn with the others); the CPU time it did use shows at its next read;
    - for a process of one thread, a read looks at ``schedstat`` first (a third of the kernel's work of
      ``stat``): one that has not run since (the same time on the CPU) has the same CPU time, command and parent
      as far as a scan cares, so its ``stat`` is read again only when it ran. ``schedstat`` counts the main
      thread alone, so a process of several threads has its ``stat`` read every time. A parent that exits
      re-parents a sleeping child unseen: its ``ppid`` is as of its last run, when it was the one that counted.

    After each scan, ``changed_pids`` holds the pids whose ``ProcessSample`` is not the one the previous scan
    returned (new processes included), so a caller can look at those alone.
    """

    def __init__(self, proc_root: Path = Path("/proc"), max_open: int | None = None) -> None:
        self.proc_root = Path(proc_root)
        self.errors = 0
        self.scans = 0
        self.listings = 0
        self.changed_pids: list[int] = []
        self._root = str(self.proc_root)
        self._statics: dict[tuple[int, int], ProcessStatic | None] = {}
        self._max_open = max_open
        self._open: dict[str, _Open] = {}  # by the pid's directory name
        self._kept_fds = 0  # the descriptors of ``_open`` (one or two each)
        self._active: dict[str, _Open] = {}  # the kept-open entries read every scan
        self._quiet: list[dict[str, _Open]] = [{} for _ in range(QUIET_READ_EVERY)]
        self._unkept: set[str] = set()  # listed processes whose stat is opened afresh each scan
        self._samples: dict[int, ProcessSample] = {}
        self._last_pid: bytes | None = None
        self._scans_since_listing = 0

    @property
    def max_open(self) -> int:
        """How many descriptors (``stat`` and ``schedstat`` files) may stay open (decided at the first scan
        unless given)."""
        if self._max_open is None:
            self._max_open = max(0, min(MAX_CACHED_FDS, raise_fd_limit() - FD_HEADROOM))
        return self._max_open

    def open_files(self) -> int:
        """How many descriptors (``stat`` and ``schedstat`` files) are kept open between scans now."""
        return self._kept_fds

    def close(self) -> None:
        """Close the ``stat`` files kept open; the next scan lists and opens them again."""
        kept, self._open = self._open, {}
        self._active = {}
        self._quiet = [{} for _ in range(QUIET_READ_EVERY)]
        self._unkept = set()
        self._samples = {}
        self._last_pid = None
        self._kept_fds = 0
        for entry in kept.values():
            os.close(entry.fd)
            if entry.sched_fd >= 0:
                os.close(entry.sched_fd)

    def scan(self) -> dict[int, ProcessSample]:
        """Every process now, by pid (a new dict each scan). Static facts of processes gone (or pids reused) are
        dropped from the cache.

        A process whose ``stat`` reads the same bytes as at the last scan, or that was not due for a read, gives
        the same ``ProcessSample`` object as the last scan.
        """
        self.scans += 1
        self.changed_pids = changed = []
        # the last pid first, then the listing: a process created in between moves it, so the next scan lists
        last_pid = self._read_last_pid()
        listing: list[str] | None = None
        if last_pid is None or last_pid != self._last_pid or self._scans_since_listing + 1 >= LIST_EVERY:
            try:
                listing = os.listdir(self._root)
            except OSError as exc:
                raise SourceUnavailable(
                    f"{self._root}: cannot list processes ({exc.strerror}); is proc mounted?"
                ) from None
            self._last_pid = last_pid
            self._scans_since_listing = 0
            self.listings += 1
        else:
            self._scans_since_listing += 1
        samples = self._samples
        gone: list[str] = []
        if listing is not None:
            listed = set(listing)
            for name in self._open.keys() - listed:  # exited: no longer listed
                self._forget(name)
                gone.append(name)
            gone += self._unkept - listed
            self._unkept &= listed
            new_names = [name for name in listed - self._open.keys() - self._unkept if name.isdigit()]
        else:
            new_names = []
        newly_listed = len(new_names)
        # kept-open stat files due this scan: the busy ones, and one bucket of the quiet ones
        due = list(self._active.items())
        due += self._quiet[self.scans % QUIET_READ_EVERY].items()
        pread = os.pread
        for name, entry in due:
            sched_fd = entry.sched_fd
            if sched_fd >= 0:
                try:
                    sched = pread(sched_fd, _SCHEDSTAT_READ, 0)
                except OSError:  # ESRCH: reaped
                    sched = b""
                if entry.single and sched and sched == entry.sched:  # not run since: its stat is as it was
                    data = entry.data
                else:
                    entry.sched = sched
                    data = b""
            else:
                data = b""
            if not data:
                try:
                    data = pread(entry.fd, _STAT_READ, 0)
                except OSError:  # ESRCH: reaped (the pid may be someone else's now)
                    data = b""
            if data == entry.data:
                entry.quiet += 1
                if entry.quiet == QUIET_AFTER and entry.bucket < 0:
                    del self._active[name]
                    entry.bucket = entry.fd % QUIET_READ_EVERY
                    self._quiet[entry.bucket][name] = entry
                continue
            if data:
                parsed = parse_stat(data, entry.sample.pid)
                if parsed is not None and parsed.starttime == entry.sample.starttime:
                    entry.data = data
                    entry.single = threads_of(data) == 1
                    entry.sample = parsed
                    samples[parsed.pid] = parsed
                    changed.append(parsed.pid)
                    if entry.bucket >= 0:
                        del self._quiet[entry.bucket][name]
                        entry.bucket = -1
                        self._active[name] = entry
                    entry.quiet = 0
                    continue
            # gone, garbage or another process: read the pid afresh below; if it does not open, it is gone
            self._forget(name)
            new_names.append(name)
        new_names += self._unkept  # not kept open (a fake tree, or past max_open): opened every scan
        self._unkept = set()
        room = self.max_open - self._kept_fds
        for index, name in enumerate(new_names):
            pid = int(name)
            try:
                fd = os.open(f"{self._root}/{name}/stat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # exited since the listing: ENOENT, or ESRCH while it is being reaped
                if index < newly_listed:
                    self.errors += 1  # listed just now, gone before its stat was read
                gone.append(name)
                continue
            keep = False
            try:
                data = os.read(fd, _READ_CHUNK)
                # a file the kernel makes up on read (size 0) can be read again; a regular file may be replaced
                keep = room > 0 and len(data) < _STAT_READ and os.fstat(fd).st_size == 0
            except OSError:
                data = b""
            finally:
                if not keep:
                    os.close(fd)
            parsed = parse_stat(data, pid)
            if parsed is None:
                self.errors += 1
                if keep:
                    os.close(fd)
                gone.append(name)
                continue
            previous = samples.get(pid)
            if previous is not None and previous == parsed:
                parsed = previous  # same bytes as before: the same sample object
            else:
                samples[pid] = parsed
                changed.append(pid)
            if keep:
                entry = _Open(fd, data, parsed, *self._open_schedstat(name, fd, data, room - 1))
                self._open[name] = self._active[name] = entry
                kept = 1 if entry.sched_fd < 0 else 2
                self._kept_fds += kept
                room -= kept
            else:
                self._unkept.add(name)
        for name in gone:
            pid = int(name)
            if name not in self._open and name not in self._unkept:
                samples.pop(pid, None)
        if gone or changed:
            stale = [
                key
                for key, static in self._statics.items()
                if (seen := samples.get(key[0])) is None
                or seen.starttime != key[1]  # gone, or the pid reused
                or (static is not None and static.comm != seen.comm)  # exec'd since it was read
            ]
            for key in stale:
                del self._statics[key]
        return dict(samples)

    def _open_schedstat(self, name: str, stat_fd: int, stat: bytes, room: int) -> tuple[int, bytes]:
        """(descriptor, contents) of the process's ``schedstat``, kept open beside its ``stat`` (``stat_fd``, read
        as ``stat``); (-1, b"") for a process of several threads (schedstat counts the main thread alone), when
        descriptors are past half of ``max_open`` (the rest stay for ``stat`` files), without such a file or with
        one that says nothing (a kernel without ``CONFIG_SCHED_INFO``), or when the process is gone."""
        if room < self.max_open // 2 or threads_of(stat) != 1:
            return -1, b""
        try:
            sched_fd = os.open(f"{self._root}/{name}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1, b""
        try:
            sched = os.pread(sched_fd, _SCHEDSTAT_READ, 0)
            # stat's descriptor still reads: the process is alive, so the pid was not reused for the open above;
            # and if stat moved since it was read, the process ran in between: its next scan reads stat again
            moved = os.pread(stat_fd, _STAT_READ, 0) != stat
        except OSError:
            os.close(sched_fd)
            return -1, b""
        if not sched or sched.startswith(b"0 "):  # no run time on record: nothing to tell a change by
            os.close(sched_fd)
            return -1, b""
        return sched_fd, b"" if moved else sched

    def _forget(self, name: str) -> None:
        entry = self._open.pop(name)
        if entry.bucket >= 0:
            del self._quiet[entry.bucket][name]
        else:
            del self._active[name]
        os.close(entry.fd)
        self._kept_fds -= 1
        if entry.sched_fd >= 0:
            os.close(entry.sched_fd)
            self._kept_fds -= 1

    def _read_last_pid(self) -> bytes | None:
        """The last pid the kernel handed out (``loadavg``'s fifth field), or None when it cannot be read."""
        try:
            with open(f"{self._root}/loadavg", "rb") as handle:
                fields = handle.read(128).split()
        except OSError:
            return None
        return fields[4] if len(fields) == 5 else None

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
            comm=sample.comm,
            pod_uid=cgroup.pod_uid,
            container_id=cgroup.container_id,
            unit=cgroup.unit,
            slurm_job=cgroup.slurm_job,
        )

    def cached(self) -> int:
        """How many (pid, starttime) entries the static cache holds."""
        return len(self._statics)
