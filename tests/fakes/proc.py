"""Fake ``/proc`` trees for tests and benchmarks: ``<root>/<pid>/{stat,cmdline,environ,cgroup}`` as Linux writes them.

``stat`` has all 52 fields of proc(5) (Linux 3.5+); ``cmdline`` and ``environ`` are NUL-separated, ``cmdline``
NUL-terminated. Point ``ProcessTable`` at ``root``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CGROUP = "0::/user.slice/user-1000.slice/session-2.scope\n"


@dataclass
class FakeProcess:
    pid: int
    ppid: int
    comm: str
    cmdline: tuple[str, ...]
    environ: dict[str, str] = field(default_factory=dict)
    cgroup: str = DEFAULT_CGROUP
    utime: int = 0
    stime: int = 0
    starttime: int = 0
    state: str = "S"


def stat_line(process: FakeProcess) -> str:
    """One realistic ``/proc/<pid>/stat`` line; times in clock ticks."""
    fields = [
        str(process.pid),  # 1 pid
        f"({process.comm})",  # 2 comm
        process.state,  # 3 state
        str(process.ppid),  # 4 ppid
        str(process.pid),  # 5 pgrp
        str(process.pid),  # 6 session
        "0",  # 7 tty_nr
        "-1",  # 8 tpgid
        "4194560",  # 9 flags
        "61234",  # 10 minflt
        "0",  # 11 cminflt
        "12",  # 12 majflt
        "0",  # 13 cmajflt
        str(process.utime),  # 14 utime
        str(process.stime),  # 15 stime
        "0",  # 16 cutime
        "0",  # 17 cstime
        "20",  # 18 priority
        "0",  # 19 nice
        "4",  # 20 num_threads
        "0",  # 21 itrealvalue
        str(process.starttime),  # 22 starttime
        "2199023255",  # 23 vsize (bytes)
        "51234",  # 24 rss (pages)
        "18446744073709551615",  # 25 rsslim
        "94251111333888",  # 26 startcode
        "94251111999999",  # 27 endcode
        "140725048590080",  # 28 startstack
        "0",  # 29 kstkesp
        "0",  # 30 kstkeip
        "0",  # 31 signal
        "0",  # 32 blocked
        "16781312",  # 33 sigignore
        "134235650",  # 34 sigcatch
        "1",  # 35 wchan
        "0",  # 36 nswap
        "0",  # 37 cnswap
        "17",  # 38 exit_signal
        "3",  # 39 processor
        "0",  # 40 rt_priority
        "0",  # 41 policy
        "0",  # 42 delayacct_blkio_ticks
        "0",  # 43 guest_time
        "0",  # 44 cguest_time
        "94251112000000",  # 45 start_data
        "94251112100000",  # 46 end_data
        "94251130000000",  # 47 start_brk
        "140725048593000",  # 48 arg_start
        "140725048593100",  # 49 arg_end
        "140725048593100",  # 50 env_start
        "140725048594000",  # 51 env_end
        "0",  # 52 exit_code
    ]
    assert len(fields) == 52
    return " ".join(fields) + "\n"


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.processes: dict[int, FakeProcess] = {}
        self._next_starttime = 1000

    def add(
        self,
        pid: int,
        ppid: int,
        comm: str,
        cmdline: Sequence[str] | str,
        environ: Mapping[str, str] | None = None,
        cgroup: str | None = None,
        utime: int = 0,
        stime: int = 0,
        starttime: int | None = None,
    ) -> FakeProcess:
        """Add (or replace: pid reuse) a process. ``cmdline`` as argv, or one string split at spaces.

        ``starttime`` defaults to one tick after the last process added, so children start after parents.
        """
        if starttime is None:
            starttime = self._next_starttime
        self._next_starttime = max(self._next_starttime, starttime) + 1
        argv = tuple(cmdline.split()) if isinstance(cmdline, str) else tuple(cmdline)
        process = FakeProcess(
            pid,
            ppid,
            comm,
            argv,
            dict(environ or {}),
            DEFAULT_CGROUP if cgroup is None else cgroup,
            utime,
            stime,
            starttime,
        )
        directory = self.root / str(pid)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir()
        (directory / "stat").write_text(stat_line(process))
        (directory / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
        (directory / "environ").write_bytes(
            b"".join(f"{key}={value}".encode() + b"\0" for key, value in process.environ.items())
        )
        (directory / "cgroup").write_text(process.cgroup)
        self.processes[pid] = process
        return process

    def set_cpu(self, pid: int, utime: int, stime: int) -> None:
        """New CPU times (clock ticks) for ``pid``; rewrites its stat."""
        process = self.processes[pid]
        process.utime, process.stime = utime, stime
        (self.root / str(pid) / "stat").write_text(stat_line(process))

    def remove(self, pid: int) -> None:
        """The process exits: its directory goes."""
        del self.processes[pid]
        shutil.rmtree(self.root / str(pid))

    def path(self, pid: int) -> Path:
        return self.root / str(pid)

    def set_total_cpu(self, user: int, idle: int = 0) -> None:
        """Write ``<root>/stat``'s aggregate cpu line: all CPUs' time in clock ticks."""
        (self.root / "stat").write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 0 0 0\n")

    def set_last_pid(self, pid: int) -> None:
        """Write ``<root>/loadavg`` with ``pid`` as the last pid the kernel handed out (its fifth field)."""
        (self.root / "loadavg").write_text(f"0.10 0.20 0.30 1/{len(self.processes)} {pid}\n")
