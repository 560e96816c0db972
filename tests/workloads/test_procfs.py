from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.errors import SourceUnavailable
from collector.workloads.procfs import (
    QUIET_AFTER,
    CgroupInfo,
    ProcessTable,
    executable_name,
    parse_cgroup,
    parse_stat,
)
from tests.fakes.nobody import open_up, run_as_nobody
from tests.fakes.proc import FakeProc

POD_UID = "5f3c1a2b-7d4e-4f10-9a8b-0c1d2e3f4a5b"
CONTAINER_ID = "3b1f0c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c"


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_stat_with_spaces_and_parentheses_in_comm(proc: FakeProc) -> None:
    proc.add(1, 0, "systemd", ["/sbin/init"], starttime=1)
    proc.add(4242, 1, "my (weird) proc", ["./weird"], utime=150, stime=25, starttime=98765)
    table = ProcessTable(proc.root)
    samples = table.scan()
    weird = samples[4242]
    assert weird.comm == "my (weird) proc"
    assert weird.ppid == 1
    assert weird.starttime == 98765
    assert weird.cpu_ticks == 175
    assert table.errors == 0


def test_comm_that_looks_like_fields_is_split_at_the_last_parenthesis() -> None:
    line = b"77 (x) S 1 2 3 (y) R 5 77 77 0 -1 4194560 0 0 0 0 11 22 0 0 20 0 1 0 333 0 0\n"
    sample = parse_stat(line, 77)
    assert sample is not None
    assert sample.comm == "x) S 1 2 3 (y"
    assert (sample.ppid, sample.cpu_ticks, sample.starttime) == (5, 33, 333)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage\n",
        b"12 (short) S 1 2\n",
        b"12 (nopen S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21\n",
        b"12 (ok) S x 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21\n",
        b"13 (other pid) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21\n",
    ],
)
def test_garbage_stat_is_none(data: bytes) -> None:
    assert parse_stat(data, 12) is None


def test_garbage_stat_is_skipped_and_counted(proc: FakeProc) -> None:
    proc.add(10, 1, "good", ["good"])
    proc.add(11, 1, "bad", ["bad"])
    (proc.path(11) / "stat").write_text("not a stat line\n")
    table = ProcessTable(proc.root)
    assert set(table.scan()) == {10}
    assert table.errors == 1


def test_non_pid_entries_are_ignored(proc: FakeProc) -> None:
    proc.add(10, 1, "good", ["good"])
    (proc.root / "self").mkdir()
    (proc.root / "meminfo").write_text("MemTotal: 1 kB\n")
    table = ProcessTable(proc.root)
    assert set(table.scan()) == {10}
    assert table.errors == 0


def test_pid_without_stat_is_skipped_and_counted(proc: FakeProc) -> None:
    proc.add(10, 1, "good", ["good"])
    (proc.root / "11").mkdir()  # listed, but gone by the time its stat is opened
    table = ProcessTable(proc.root)
    assert set(table.scan()) == {10}
    assert table.errors == 1


def test_pid_that_exits_between_listing_and_read(proc: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    proc.add(10, 1, "stays", ["stays"])
    proc.add(11, 1, "exits", ["exits"])
    real_listdir = os.listdir

    def listdir_then_exit(path: Any) -> Any:
        listing = real_listdir(path)
        if str(path) == str(proc.root):  # os.listdir is global: shutil may use it too
            proc.remove(11)
        return listing

    monkeypatch.setattr(os, "listdir", listdir_then_exit)
    table = ProcessTable(proc.root)
    assert set(table.scan()) == {10}
    assert table.errors == 1


def test_esrch_while_reaped_is_skipped_and_counted(proc: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    proc.add(10, 1, "stays", ["stays"])
    proc.add(11, 1, "reaped", ["reaped"])
    real_open = os.open

    def open_esrch(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("/11/stat"):
            raise ProcessLookupError(errno.ESRCH, "No such process")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_esrch)
    table = ProcessTable(proc.root)
    assert set(table.scan()) == {10}
    assert table.errors == 1


def test_missing_proc_root_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="cannot list processes"):
        ProcessTable(tmp_path / "nope").scan()


def test_cpu_ticks_follow_the_stat(proc: FakeProc) -> None:
    proc.add(10, 1, "busy", ["busy"], utime=100, stime=10)
    table = ProcessTable(proc.root)
    assert table.scan()[10].cpu_ticks == 110
    proc.set_cpu(10, utime=400, stime=20)
    assert table.scan()[10].cpu_ticks == 420


def test_static_reads_cmdline_exe_and_only_selected_environ(proc: FakeProc) -> None:
    environ = {
        "PATH": "/usr/bin",
        "HF_TOKEN": "hf_secret",
        "WATTMETER_WORKLOAD": "llama-pretrain",
        "WATTMETER_PHASE": "training",
        "WATTMETER_JOB": "run-7",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NAME": "pretrain",
    }
    proc.add(10, 1, "python3", ["/usr/bin/python3.11", "train.py", "--lr", "3e-4"], environ=environ)
    table = ProcessTable(proc.root)
    sample = table.scan()[10]
    static = table.static(10, sample.starttime)
    assert static is not None
    assert static.cmdline == ("/usr/bin/python3.11", "train.py", "--lr", "3e-4")
    assert static.exe == "python3.11"
    assert dict(static.environ) == {
        "WATTMETER_WORKLOAD": "llama-pretrain",
        "WATTMETER_PHASE": "training",
        "WATTMETER_JOB": "run-7",
        "SLURM_JOB_ID": "123456",
    }
    assert table.errors == 0


def test_kernel_thread_has_no_cmdline_and_is_named_by_comm(proc: FakeProc) -> None:
    proc.add(2, 0, "kthreadd", [], cgroup="0::/\n")
    proc.add(95, 2, "kworker/3:1H-kblockd", [], cgroup="0::/\n")
    table = ProcessTable(proc.root)
    samples = table.scan()
    static = table.static(95, samples[95].starttime)
    assert static is not None
    assert static.cmdline == ()
    assert static.exe == "kworker/3:1H-kblockd"


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (("/usr/bin/python3", "x.py"), "python3"),
        (("nginx: worker process",), "nginx"),  # setproctitle rewrote argv into one string
        (("",), "comm"),
        ((), "comm"),
    ],
)
def test_executable_name(cmdline: tuple[str, ...], expected: str) -> None:
    assert executable_name(cmdline, "comm") == expected


def test_cmdline_without_final_nul_and_with_odd_bytes(proc: FakeProc) -> None:
    proc.add(10, 1, "python3", ["python3"])
    (proc.path(10) / "cmdline").write_bytes(b"python3\0caf\xe9.py")
    table = ProcessTable(proc.root)
    static = table.static(10, table.scan()[10].starttime)
    assert static is not None
    assert static.cmdline == ("python3", "caf\ufffd.py")


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        pytest.param(
            "0::/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CONTAINER_ID}.scope\n",
            CgroupInfo(pod_uid=POD_UID, container_id=CONTAINER_ID),
            id="v2-systemd-driver-containerd",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/crio-{CONTAINER_ID}.scope\n",
            CgroupInfo(pod_uid=POD_UID, container_id=CONTAINER_ID),
            id="v2-systemd-driver-guaranteed-crio",
        ),
        pytest.param(
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID.replace('-', '_')}.slice/"
            f"crio-conmon-{CONTAINER_ID}.scope\n",
            CgroupInfo(pod_uid=POD_UID),
            id="v2-crio-conmon-is-not-the-container",
        ),
        pytest.param(
            f"0::/kubepods/burstable/pod{POD_UID}/{CONTAINER_ID}\n",
            CgroupInfo(pod_uid=POD_UID, container_id=CONTAINER_ID),
            id="v2-cgroupfs-driver",
        ),
        pytest.param(
            f"12:pids:/kubepods/besteffort/pod{POD_UID}/{CONTAINER_ID}\n"
            f"11:cpu,cpuacct:/kubepods/besteffort/pod{POD_UID}/{CONTAINER_ID}\n"
            f"1:name=systemd:/kubepods/besteffort/pod{POD_UID}/{CONTAINER_ID}\n"
            "0::/\n",
            CgroupInfo(pod_uid=POD_UID, container_id=CONTAINER_ID),
            id="v1-hybrid-cgroupfs-driver",
        ),
        pytest.param(
            "0::/kubepods.slice/kubepods-podd41d8cd98f00b204e9800998ecf8427e.slice/"
            f"cri-containerd-{CONTAINER_ID}.scope\n",
            CgroupInfo(pod_uid="d41d8cd98f00b204e9800998ecf8427e", container_id=CONTAINER_ID),
            id="v2-static-pod-md5-uid",
        ),
        pytest.param(
            f"0::/system.slice/docker-{CONTAINER_ID}.scope\n",
            CgroupInfo(container_id=CONTAINER_ID),
            id="v2-docker",
        ),
        pytest.param(
            f"4:memory:/docker/{CONTAINER_ID}\n3:cpu,cpuacct:/docker/{CONTAINER_ID}\n",
            CgroupInfo(container_id=CONTAINER_ID),
            id="v1-docker-cgroupfs",
        ),
        pytest.param(
            f"0::/machine.slice/libpod-{CONTAINER_ID}.scope/container\n",
            CgroupInfo(container_id=CONTAINER_ID),
            id="v2-podman",
        ),
        pytest.param("0::/system.slice/vllm.service\n", CgroupInfo(unit="vllm.service"), id="v2-systemd-unit"),
        pytest.param(
            "0::/system.slice/ollama.service/runner.slice\n", CgroupInfo(unit="ollama.service"), id="v2-unit-subgroup"
        ),
        pytest.param(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/train.service\n",
            CgroupInfo(unit="train.service"),
            id="v2-user-unit-is-the-last-service",
        ),
        pytest.param(
            "7:cpuset:/slurm/uid_1000/job_4242/step_0/task_0\n"
            "4:memory:/slurm/uid_1000/job_4242/step_0/task_0\n"
            "1:name=systemd:/system.slice/slurmd.service\n",
            CgroupInfo(unit="slurmd.service", slurm_job="4242"),
            id="v1-slurm",
        ),
        pytest.param(
            "0::/system.slice/slurmstepd.scope/job_987654/step_batch/user/task_0\n",
            CgroupInfo(slurm_job="987654"),
            id="v2-slurm",
        ),
        pytest.param("0::/user.slice/user-1000.slice/session-2.scope\n", CgroupInfo(), id="v2-login-session"),
        pytest.param(
            f"0::/user.slice/pod{POD_UID}\n",
            CgroupInfo(),
            id="pod-like-name-outside-kubepods",
        ),
        pytest.param("", CgroupInfo(), id="empty"),
    ],
)
def test_cgroup_paths(cgroup: str, expected: CgroupInfo) -> None:
    info, bad = parse_cgroup(cgroup)
    assert info == expected
    assert bad == 0


def test_malformed_cgroup_lines_are_skipped_and_counted(proc: FakeProc) -> None:
    cgroup = "garbage\nx::/system.slice/a.service\n0::relative/path\n0::/system.slice/vllm.service\n"
    proc.add(10, 1, "vllm", ["vllm", "serve", "m"], cgroup=cgroup)
    table = ProcessTable(proc.root)
    static = table.static(10, table.scan()[10].starttime)
    assert static is not None
    assert static.unit == "vllm.service"
    assert table.errors == 3


def test_static_fields_from_cgroup(proc: FakeProc) -> None:
    cgroup = f"0::/kubepods/burstable/pod{POD_UID}/{CONTAINER_ID}\n"
    proc.add(10, 1, "python3", ["python3", "-m", "vllm.entrypoints.openai.api_server"], cgroup=cgroup)
    table = ProcessTable(proc.root)
    static = table.static(10, table.scan()[10].starttime)
    assert static is not None
    assert (static.pod_uid, static.container_id, static.unit, static.slurm_job) == (POD_UID, CONTAINER_ID, "", "")


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The base names of every file procfs opens."""
    names: list[str] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        names.append(os.path.basename(str(path)))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    return names


def test_static_facts_are_read_once_per_process(proc: FakeProc, opened: list[str]) -> None:
    proc.add(10, 1, "python3", ["python3", "train.py"], environ={"WATTMETER_WORKLOAD": "w"})
    table = ProcessTable(proc.root)
    samples = table.scan()
    first = table.static(10, samples[10].starttime)
    assert sorted(name for name in opened if name in ("cmdline", "environ", "cgroup")) == [
        "cgroup",
        "cmdline",
        "environ",
    ]
    opened.clear()
    samples = table.scan()
    second = table.static(10, samples[10].starttime)
    assert second is first
    assert opened == ["stat"]  # the scan's one read; nothing for the cached static facts


def test_pid_reuse_reads_again(proc: FakeProc, opened: list[str]) -> None:
    proc.add(10, 1, "python3", ["python3", "old.py"], starttime=5000)
    table = ProcessTable(proc.root)
    old = table.static(10, table.scan()[10].starttime)
    assert old is not None and old.cmdline == ("python3", "old.py")
    proc.remove(10)
    proc.add(10, 1, "python3", ["python3", "new.py"], starttime=9000)
    opened.clear()
    samples = table.scan()
    assert table.cached() == 0  # the old process's entry is dropped at the scan
    new = table.static(10, samples[10].starttime)
    assert new is not None and new.cmdline == ("python3", "new.py")
    assert "cmdline" in opened


def test_static_of_a_reused_pid_is_none(proc: FakeProc) -> None:
    proc.add(10, 1, "python3", ["python3", "new.py"], starttime=9000)
    table = ProcessTable(proc.root)
    table.scan()
    assert table.static(10, 5000) is None  # asked about the process that had pid 10 before
    assert table.static(10, 9000) is not None


def test_gone_processes_leave_the_cache(proc: FakeProc) -> None:
    proc.add(10, 1, "a", ["a"])
    proc.add(11, 1, "b", ["b"])
    table = ProcessTable(proc.root)
    samples = table.scan()
    for pid, sample in samples.items():
        table.static(pid, sample.starttime)
    assert table.cached() == 2
    proc.remove(11)
    table.scan()
    assert table.cached() == 1


def test_static_of_a_vanished_process_is_none_and_counted(proc: FakeProc) -> None:
    proc.add(10, 1, "a", ["a"])
    table = ProcessTable(proc.root)
    starttime = table.scan()[10].starttime
    proc.remove(10)
    assert table.static(10, starttime) is None
    assert table.errors == 1


@pytest.fixture
def world_traversable_proc() -> Iterator[FakeProc]:
    root = Path(tempfile.mkdtemp(prefix="wattmeter-proc-"))
    os.chmod(root, 0o755)
    try:
        proc = FakeProc(root / "proc")
        proc.add(1, 0, "systemd", ["/sbin/init"], starttime=1)
        proc.add(10, 1, "python3", ["python3", "serve.py"], environ={"WATTMETER_WORKLOAD": "secret-team"})
        open_up(root, 0o444)
        # /proc/<pid>/environ is 0400 and owned by the process's user; a non-root owner could still read 0400
        os.chmod(proc.path(10) / "environ", 0o400 if os.geteuid() == 0 else 0o000)
        yield proc
    finally:
        shutil.rmtree(root)


ENVIRON_PROBE = """
import sys
from pathlib import Path
from collector.workloads.procfs import ProcessTable
drop()
table = ProcessTable(Path(sys.argv[1]))
samples = table.scan()
static = table.static(10, samples[10].starttime)
again = table.static(10, samples[10].starttime)
print(static.cmdline, dict(static.environ), table.errors, again is static)
"""


def test_unreadable_environ_is_empty_and_counted_once(world_traversable_proc: FakeProc) -> None:
    result = run_as_nobody(ENVIRON_PROBE, str(world_traversable_proc.root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "('python3', 'serve.py') {} 1 True"


REAL_PROC_PROBE = """
from pathlib import Path
from collector.workloads.procfs import ProcessTable
drop()
table = ProcessTable(Path("/proc"))
samples = table.scan()
static = table.static(1, samples[1].starttime)
print(static.exe != "")
print(dict(static.environ))
print(table.errors)
"""


@pytest.mark.skipif(not Path("/proc/1/stat").exists(), reason="needs Linux /proc")
def test_real_proc_environ_of_another_user_is_denied() -> None:
    if os.geteuid() != 0 and os.stat("/proc/1").st_uid == os.geteuid():
        pytest.skip("pid 1 belongs to this user, so its environ is readable")
    result = run_as_nobody(REAL_PROC_PROBE)
    assert result.returncode == 0, result.stderr
    named, environ, errors = result.stdout.split("\n")[:3]
    assert named == "True"
    assert environ == "{}"
    assert int(errors) >= 1


def test_fake_tree_stat_files_are_not_kept_open(proc: FakeProc) -> None:
    proc.add(10, 1, "a", ["a"])
    table = ProcessTable(proc.root)
    assert set(table.scan()) == {10}
    assert table.open_files() == 0  # a regular file may be replaced under the same name: open it every scan


def test_parse_stat_ignores_what_follows_starttime() -> None:
    line = b"9 (p) S 1 9 9 0 -1 0 0 0 0 0 7 8 0 0 20 0 1 0 4242"  # cut right after starttime
    sample = parse_stat(line, 9)
    assert sample is not None and (sample.ppid, sample.cpu_ticks, sample.starttime) == (1, 15, 4242)


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


@needs_proc
def test_real_proc_keeps_stat_open_and_drops_a_reaped_process(sleeper: subprocess.Popen[bytes]) -> None:
    table = ProcessTable(Path("/proc"))
    try:
        first = table.scan()
        assert sleeper.pid in first and os.getpid() in first
        assert table.open_files() >= 2
        opened_before = table.open_files()
        second = table.scan()
        assert second[sleeper.pid].starttime == first[sleeper.pid].starttime
        assert table.open_files() >= opened_before - 5  # kept, not reopened (other processes may come and go)
        sleeper.kill()
        sleeper.wait()
        third = table.scan()
        assert sleeper.pid not in third
        assert str(sleeper.pid) not in table._open
        assert table.errors == 0
    finally:
        table.close()
    assert table.open_files() == 0


@needs_proc
def test_real_proc_failed_pread_reopens(sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    table = ProcessTable(Path("/proc"))
    try:
        table.scan()
        entry = table._open[str(sleeper.pid)]
        stale_fds = {entry.fd, entry.sched_fd}  # a reaped process's stat and schedstat both fail
        real_pread = os.pread

        def pread_esrch(fd: int, length: int, offset: int) -> bytes:
            if fd in stale_fds:
                raise ProcessLookupError(errno.ESRCH, "No such process")
            return real_pread(fd, length, offset)

        reopened: list[str] = []
        real_open = os.open

        def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            reopened.append(str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "pread", pread_esrch)
        monkeypatch.setattr(os, "open", recording_open)
        again = table.scan()  # the pid is still listed: whatever process holds it now is read afresh
        assert sleeper.pid in again
        assert f"/proc/{sleeper.pid}/stat" in reopened
        assert str(sleeper.pid) in table._open
        assert table.errors == 0
    finally:
        table.close()


@needs_proc
def test_real_proc_open_files_are_capped(sleeper: subprocess.Popen[bytes]) -> None:
    capped = ProcessTable(Path("/proc"), max_open=2)
    try:
        samples = capped.scan()
        assert sleeper.pid in samples and os.getpid() in samples
        assert capped.open_files() == 2  # the rest are opened, read and closed each scan
        again = capped.scan()
        assert sleeper.pid in again and capped.open_files() == 2
    finally:
        capped.close()


@needs_proc
def test_default_cap_leaves_headroom_under_the_fd_limit() -> None:
    import resource

    from collector.workloads.procfs import FD_HEADROOM, MAX_CACHED_FDS

    table = ProcessTable(Path("/proc"))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert table.max_open == max(0, min(MAX_CACHED_FDS, soft - FD_HEADROOM))


def test_a_sleeping_process_is_read_once_every_few_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    import collector.workloads.procfs as procfs

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 5  # until exec is done and the process sleeps, its stat still changes
        while Path(f"/proc/{sleeper.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        table = procfs.ProcessTable(Path("/proc"))
        table.scan()
        entry = table._open.get(str(sleeper.pid))
        assert entry is not None, "stat of a live process is kept open"
        reads: list[int] = []
        stat_reads: list[int] = []
        real_pread = os.pread

        def counting_pread(fd: int, length: int, offset: int) -> bytes:
            if fd in (entry.fd, entry.sched_fd):
                reads.append(fd)
            if fd == entry.fd:
                stat_reads.append(fd)
            return real_pread(fd, length, offset)

        monkeypatch.setattr(procfs.os, "pread", counting_pread)
        scans = procfs.QUIET_AFTER + 3 * procfs.QUIET_READ_EVERY
        for _ in range(scans):
            assert sleeper.pid in table.scan()  # still listed every scan, read or not
        assert procfs.QUIET_AFTER <= len(reads) <= procfs.QUIET_AFTER + 4, reads
        if entry.sched_fd >= 0:  # a kernel with schedstat: a process that never ran has its stat never read again
            assert stat_reads == []
        table.close()
    finally:
        sleeper.kill()
        sleeper.wait(5)


@needs_proc
def test_real_proc_a_process_that_runs_has_its_stat_read_again() -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfor line in sys.stdin: sum(range(300_000))"], stdin=subprocess.PIPE
    )
    assert busy.stdin is not None
    table = ProcessTable(Path("/proc"))
    try:
        time.sleep(0.3)
        first = table.scan()[busy.pid]
        for _ in range(QUIET_AFTER + 2):  # quiet now: read once in a while at most
            table.scan()
        entry = table._open[str(busy.pid)]
        if entry.sched_fd < 0:
            pytest.skip("no schedstat on this kernel")
        for _ in range(40):  # about 0.4 s on the CPU: its CPU time moves past a tick
            busy.stdin.write(b"x\n")
        busy.stdin.flush()
        deadline = time.monotonic() + 10
        ticks = first.cpu_ticks
        while ticks == first.cpu_ticks and time.monotonic() < deadline:
            time.sleep(0.1)
            ticks = table.scan()[busy.pid].cpu_ticks
        assert ticks > first.cpu_ticks  # schedstat moved, so stat was read again
    finally:
        table.close()
        busy.kill()
        busy.wait(5)


@needs_proc
def test_real_proc_a_process_whose_other_threads_run_has_its_stat_read() -> None:
    # schedstat counts the main thread alone: here it waits in join() while a worker spins
    script = (
        "import sys, threading, time\n"
        "def spin():\n"
        "    for line in sys.stdin:\n"
        "        end = time.monotonic() + 0.5\n"
        "        while time.monotonic() < end: pass\n"
        "worker = threading.Thread(target=spin)\n"
        "worker.start()\n"
        "worker.join()\n"
    )
    busy = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    assert busy.stdin is not None
    table = ProcessTable(Path("/proc"))
    try:
        time.sleep(0.5)
        for _ in range(QUIET_AFTER + 2):  # quiet by now
            first = table.scan()[busy.pid]
        busy.stdin.write(b"x\n")
        busy.stdin.flush()
        deadline = time.monotonic() + 10
        ticks = first.cpu_ticks
        while ticks < first.cpu_ticks + 20 and time.monotonic() < deadline:  # 0.5 s on the CPU: about 50 ticks
            time.sleep(0.1)
            ticks = table.scan()[busy.pid].cpu_ticks
        assert ticks >= first.cpu_ticks + 20
    finally:
        table.close()
        busy.kill()
        busy.wait(5)


# --- incremental scans -----------------------------------------------------------------------------------------


def test_the_root_is_listed_only_when_a_pid_was_handed_out(proc: FakeProc) -> None:
    from collector.workloads.procfs import LIST_EVERY

    proc.add(10, 1, "python", "python serve.py")
    proc.set_last_pid(10)
    table = ProcessTable(proc.root)
    assert set(table.scan()) == {10}
    proc.add(11, 1, "python", "python other.py")  # created, but the fake kernel's last pid did not move
    assert set(table.scan()) == {10}
    proc.set_last_pid(11)
    assert set(table.scan()) == {10, 11}
    assert table.listings == 2
    proc.add(12, 1, "python", "python third.py")  # a stalled last pid: the backstop listing still finds it
    seen_at = next(n for n in range(1, LIST_EVERY + 1) if 12 in table.scan())
    assert seen_at <= LIST_EVERY


def test_an_exit_is_noticed_between_listings(proc: FakeProc) -> None:
    proc.add(10, 1, "python", "python serve.py")
    proc.add(11, 1, "python", "python other.py")
    proc.set_last_pid(11)
    table = ProcessTable(proc.root)
    table.scan()
    proc.remove(11)
    assert set(table.scan()) == {10}
    assert table.listings == 1


def test_without_loadavg_every_scan_lists(proc: FakeProc) -> None:
    proc.add(10, 1, "python", "python serve.py")
    table = ProcessTable(proc.root)
    table.scan()
    proc.add(11, 1, "python", "python other.py")
    assert set(table.scan()) == {10, 11}
    assert table.listings == 2


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["cpu", "add", "remove", "bump", "scan"]), st.integers(10, 15), st.integers(0, 50)),
        max_size=40,
    )
)
def test_changed_pids_are_exactly_the_samples_that_changed(
    steps: list[tuple[str, int, int]],
) -> None:
    """The contract the tracker relies on: after each scan, ``changed_pids`` are the pids whose sample is not the
    object the previous scan returned (new ones included)."""
    with tempfile.TemporaryDirectory() as directory:
        proc = FakeProc(Path(directory))
        proc.add(10, 1, "python", "python serve.py")
        proc.set_last_pid(10)
        table = ProcessTable(proc.root)
        previous = table.scan()
        assert sorted(table.changed_pids) == [10]
        last_pid = 10
        for action, pid, ticks in steps:
            if action == "cpu" and pid in proc.processes:
                proc.set_cpu(pid, ticks, 0)
            elif action == "add":
                proc.add(pid, 1, "worker", f"worker {pid}", utime=ticks)
                last_pid += 1
                proc.set_last_pid(last_pid)
            elif action == "remove" and pid in proc.processes and pid != 10:
                proc.remove(pid)
            elif action == "bump":
                last_pid += 1
                proc.set_last_pid(last_pid)
            current = table.scan()
            expected = {p for p, sample in current.items() if previous.get(p) is not sample}
            assert sorted(table.changed_pids) == sorted(expected)
            assert set(current) <= set(proc.processes) | set(previous)
            previous = current
