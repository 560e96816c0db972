"""The agent's spool on real files in tmp_path: round trips, restarts, torn and corrupt records, the cap, a full disk,
a writer and a reader thread at once, and random histories against an in-memory model."""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector import spool as spool_module
from collector.spool import HEADER_BYTES, Spool, SpoolError

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0  # generous: these waits only end early on a healthy machine


def payload_for(record_no: int, size: int | None = None) -> bytes:
    """A payload that says which record it is, so a mix-up cannot go unnoticed."""
    tag = f"<record {record_no}>".encode()
    size = len(tag) * (record_no % 7 + 1) if size is None else size
    return (tag * (size // len(tag) + 1))[:size]


def records(spool: Spool, start: int = 0, max_records: int | None = None) -> list[tuple[int, bytes]]:
    return list(spool.read_from(start, max_records))


def numbers(spool: Spool, start: int = 0) -> list[int]:
    return [record_no for record_no, _ in spool.read_from(start)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in segment_files(directory))


def fill(spool: Spool, count: int, size: int | None = None) -> list[int]:
    return [spool.append(payload_for(spool.next_record_no, size)) for _ in range(count)]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def open_spool(spool_dir: Path) -> Iterator[Callable[..., Spool]]:
    """Opens spools in ``spool_dir`` (fsync "never" unless asked) and closes whatever is still open at the end."""
    opened: list[Spool] = []

    def make(**kwargs: object) -> Spool:
        kwargs.setdefault("fsync", "never")
        spool = Spool(spool_dir, **kwargs)  # type: ignore[arg-type]
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        spool.close()


# ------------------------------------------------------------------------------------------------------------------
# Round trip, restart, release


def test_append_read_release_round_trip(open_spool: Callable[..., Spool]) -> None:
    spool = open_spool()
    assert spool.first_pending is None
    assert spool.next_record_no == 1
    assert fill(spool, 5) == [1, 2, 3, 4, 5]
    assert records(spool) == [(n, payload_for(n)) for n in range(1, 6)]
    assert numbers(spool, 3) == [3, 4, 5]
    assert [n for n, _ in records(spool, 2, max_records=2)] == [2, 3]
    assert records(spool, 1, max_records=0) == []
    assert records(spool, 6) == []
    assert spool.first_pending == 1

    spool.release_through(2)
    assert numbers(spool) == [3, 4, 5]
    assert spool.first_pending == 3
    spool.release_through(1)  # behind the watermark: nothing changes
    assert spool.first_pending == 3
    spool.release_through(5)
    assert records(spool) == []
    assert spool.first_pending is None
    assert spool.append(b"") == 6
    assert records(spool) == [(6, b"")]


def test_bytes_is_what_is_on_disk(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = open_spool(segment_bytes=1000)
    fill(spool, 40, size=100)
    assert spool.bytes == disk_bytes(spool_dir) == 40 * (100 + HEADER_BYTES)
    spool.release_through(30)
    assert spool.bytes == disk_bytes(spool_dir) < 40 * (100 + HEADER_BYTES)


def test_new_directory_is_private(spool_dir: Path, open_spool: Callable[..., Spool]) -> None:
    open_spool()
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700


def test_restart_keeps_pending_records_and_numbering(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = open_spool(segment_bytes=300)
    fill(spool, 20)
    spool.release_through(8)
    spool.close()

    spool = open_spool(segment_bytes=300)
    assert spool.first_pending == 9
    assert records(spool) == [(n, payload_for(n)) for n in range(9, 21)]
    assert spool.next_record_no == 21
    assert spool.append(payload_for(21)) == 21


def test_restart_after_everything_was_released_replays_nothing(
    open_spool: Callable[..., Spool], spool_dir: Path
) -> None:
    spool = open_spool(segment_bytes=300)
    fill(spool, 20)
    spool.release_through(20)
    assert len(segment_files(spool_dir)) == 1  # the active segment stays; every sealed one went
    spool.close()

    spool = open_spool(segment_bytes=300)
    assert spool.first_pending is None
    assert records(spool) == []
    assert spool.append(b"next") == 21


def test_release_of_a_record_not_appended_is_refused(open_spool: Callable[..., Spool]) -> None:
    spool = open_spool()
    fill(spool, 3)
    with pytest.raises(ValueError, match="last one appended is 3"):
        spool.release_through(4)


def test_reading_sees_records_appended_while_iterating(open_spool: Callable[..., Spool]) -> None:
    spool = open_spool()
    fill(spool, 2)
    reader = spool.read_from(1)
    assert next(reader)[0] == 1
    fill(spool, 1)
    assert [n for n, _ in reader] == [2, 3]


def test_closed_spool_refuses_appends(open_spool: Callable[..., Spool]) -> None:
    spool = open_spool()
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append(b"x")


# ------------------------------------------------------------------------------------------------------------------
# Torn and corrupt records


RECORD_50 = 50 + HEADER_BYTES


@pytest.mark.parametrize(
    "left", [RECORD_50 - 1, HEADER_BYTES // 2, HEADER_BYTES + 3], ids=["all-but-a-byte", "half-header", "some-payload"]
)
def test_torn_tail_is_cut_off_and_never_returned(open_spool: Callable[..., Spool], spool_dir: Path, left: int) -> None:
    """``left``: the bytes of the last record that reached the disk before the writer died."""
    spool = open_spool()
    fill(spool, 5, size=50)
    spool.close()
    (segment,) = segment_files(spool_dir)
    os.truncate(segment, 4 * RECORD_50 + left)

    spool = open_spool()
    assert records(spool) == [(n, payload_for(n, 50)) for n in range(1, 5)]
    assert spool.truncated_bytes == left
    assert spool.corrupt_records == 0
    assert spool.append(payload_for(5, 50)) == 5  # the torn record never was: its number is given again
    assert spool.append(payload_for(6, 50)) == 6
    spool.close()

    spool = open_spool()
    assert records(spool) == [(n, payload_for(n, 50)) for n in range(1, 7)]
    assert spool.truncated_bytes == 0


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 4096, os.urandom(777), b"WSR1" + b"\xff" * 30, spool_module.encode_record(6, b"x")[:-1]],
    ids=["zeros", "random", "bad-header", "short-record"],
)
def test_garbage_after_the_last_record_is_cut_off(
    open_spool: Callable[..., Spool], spool_dir: Path, garbage: bytes
) -> None:
    spool = open_spool()
    fill(spool, 5)
    spool.close()
    (segment,) = segment_files(spool_dir)
    good = segment.stat().st_size
    with segment.open("ab") as handle:
        handle.write(garbage)

    spool = open_spool()
    assert records(spool) == [(n, payload_for(n)) for n in range(1, 6)]
    assert segment.stat().st_size == good
    assert spool.truncated_bytes == len(garbage)
    assert spool.append(b"after") == 6
    assert records(spool, 6) == [(6, b"after")]


def test_kill_9_mid_append_loses_no_reported_record(spool_dir: Path) -> None:
    """A real agent-like process appending as fast as it can, killed with SIGKILL: every append that returned is
    there after a restart, numbering has no hole, and nothing torn comes back."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from collector.spool import Spool\n"
        "from tests.test_spool import payload_for\n"
        "spool = Spool(Path(sys.argv[1]), segment_bytes=1 << 20, fsync='never')\n"
        "while True:\n"
        "    n = spool.next_record_no\n"
        "    spool.append(payload_for(n, (n * 7919) % (256 << 10)))\n"
        "    print(n, flush=True)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(spool_dir)], stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True
    )
    assert child.stdout is not None
    reported = 0
    try:
        for line in child.stdout:
            reported = int(line)
            if reported >= 300:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(WAIT_S)
        child.stdout.close()
    assert reported >= 300, "the child stopped before appending"

    with Spool(spool_dir, fsync="never") as spool:
        got = records(spool)
        assert [n for n, _ in got] == list(range(1, len(got) + 1))
        assert len(got) >= reported
        assert all(payload == payload_for(n, (n * 7919) % (256 << 10)) for n, payload in got)
        assert spool.corrupt_records == 0


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("where", ["payload", "header"])
@pytest.mark.parametrize("damaged", [5, 10], ids=["middle", "last"])
@pytest.mark.parametrize("segment_kind", ["active", "sealed"])
def test_flipped_byte_loses_one_record_and_counts_it(
    open_spool: Callable[..., Spool], spool_dir: Path, where: str, damaged: int, segment_kind: str
) -> None:
    """Records 1..10 fill the first segment (the active one, or sealed when 11..15 follow). Damage to the last record
    of the active segment is indistinguishable from a torn write: cut off, not counted."""
    size = 40
    record_bytes = size + HEADER_BYTES
    total = 10 if segment_kind == "active" else 15
    spool = open_spool(segment_bytes=10 * record_bytes)
    fill(spool, total, size=size)
    spool.close()
    offset_in_record = HEADER_BYTES + 7 if where == "payload" else 9  # 9: inside the record number
    flip_byte(segment_files(spool_dir)[0], (damaged - 1) * record_bytes + offset_in_record)

    spool = open_spool(segment_bytes=10 * record_bytes)
    expected = [n for n in range(1, total + 1) if n != damaged]
    torn = segment_kind == "active" and damaged == total
    assert numbers(spool) == expected
    assert spool.corrupt_records == (0 if torn else 1)
    assert spool.truncated_bytes == (record_bytes if torn else 0)
    assert numbers(spool) == expected
    assert spool.corrupt_records == (0 if torn else 1)  # counted once, not at every read
    assert spool.append(b"more") == (damaged if torn else total + 1)


def test_damage_while_running_is_found_at_read(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = open_spool()
    fill(spool, 6, size=30)
    flip_byte(segment_files(spool_dir)[0], 2 * (30 + HEADER_BYTES) + HEADER_BYTES + 1)  # record 3's payload
    assert numbers(spool) == [1, 2, 4, 5, 6]
    assert spool.corrupt_records == 1
    assert numbers(spool) == [1, 2, 4, 5, 6]
    assert spool.corrupt_records == 1


def test_numbers_handed_out_before_a_release_are_never_given_again(
    open_spool: Callable[..., Spool], spool_dir: Path
) -> None:
    spool = open_spool()
    fill(spool, 9, size=50)
    spool.release_through(3)
    spool.close()
    (segment,) = segment_files(spool_dir)
    os.truncate(segment, 5 * RECORD_50)  # a power loss took 6..9 (fsync "never"), which may have been sent

    spool = open_spool()
    assert numbers(spool) == [4, 5]
    assert spool.append(b"x") == 10


def test_segments_deleted_behind_the_spools_back(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = open_spool(segment_bytes=3 * RECORD_50)
    fill(spool, 8, size=50)  # segments 1-3, 4-6, 7-8 (active, with room for one more)
    first, _, active = segment_files(spool_dir)
    first.unlink()
    assert numbers(spool) == [4, 5, 6, 7, 8]
    assert spool.corrupt_records == 3
    active.unlink()
    assert numbers(spool) == [4, 5, 6]
    assert spool.corrupt_records == 5
    assert spool.append(payload_for(9, 50)) == 9  # into a new file, not the deleted one
    assert spool.bytes == disk_bytes(spool_dir)
    spool.close()

    spool = open_spool(segment_bytes=3 * RECORD_50)
    assert records(spool) == [(n, payload_for(n, 50)) for n in (4, 5, 6, 9)]


def test_segment_that_could_not_be_deleted_at_release_goes_at_the_next_start(
    open_spool: Callable[..., Spool], spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(segment_bytes=3 * RECORD_50)
    fill(spool, 9, size=50)

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    spool.release_through(7)
    monkeypatch.undo()
    assert len(segment_files(spool_dir)) == 3
    spool.close()

    spool = open_spool(segment_bytes=3 * RECORD_50)
    assert len(segment_files(spool_dir)) == 1
    assert spool.bytes == disk_bytes(spool_dir)
    assert numbers(spool) == [8, 9]


def test_damaged_state_file_replays_rather_than_loses(
    open_spool: Callable[..., Spool], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = open_spool()
    fill(spool, 5)
    spool.release_through(3)
    spool.close()
    (spool_dir / "state.json").write_bytes(b'{"format": 1, "released_thr')
    with caplog.at_level(logging.WARNING, logger="collector.spool"):
        spool = open_spool()
    assert "unreadable" in caplog.text
    assert numbers(spool) == [1, 2, 3, 4, 5]
    assert spool.append(b"x") == 6


# ------------------------------------------------------------------------------------------------------------------
# The cap


def test_cap_drops_oldest_segments_and_counts_their_records(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    record_bytes = 100 + HEADER_BYTES
    spool = open_spool(segment_bytes=4 * record_bytes, max_bytes=12 * record_bytes)
    fill(spool, 6, size=100)
    spool.release_through(2)  # released records are not counted as dropped when their segment goes
    fill(spool, 24, size=100)

    assert spool.bytes == disk_bytes(spool_dir) <= 12 * record_bytes
    kept = numbers(spool)
    assert kept == list(range(kept[0], 31))  # the newest, without a hole
    assert spool.first_pending == kept[0]
    assert spool.dropped_records == kept[0] - 1 - 2
    assert records(spool) == [(n, payload_for(n, 100)) for n in kept]


def test_cap_never_drops_the_active_segment(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = open_spool(segment_bytes=1 << 20, max_bytes=5 * (100 + HEADER_BYTES))
    fill(spool, 12, size=100)
    assert spool.bytes == disk_bytes(spool_dir) <= 5 * (100 + HEADER_BYTES)
    kept = numbers(spool)
    assert kept[-1] == 12
    assert spool.dropped_records == 12 - len(kept)


def test_cap_warning_at_most_once_a_minute(open_spool: Callable[..., Spool], caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    record_bytes = 100 + HEADER_BYTES
    spool = open_spool(segment_bytes=2 * record_bytes, max_bytes=4 * record_bytes, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="collector.spool"):
        fill(spool, 20, size=100)
        assert spool.dropped_records > 2
        assert sum("is full" in r.message for r in caplog.records) == 1
        now[0] += 61.0
        fill(spool, 4, size=100)
    warnings = [r.message for r in caplog.records if "is full" in r.message]
    assert len(warnings) == 2
    assert "spool_max_bytes" in warnings[0]


def test_a_record_bigger_than_a_segment_gets_its_own(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = open_spool(segment_bytes=1000)
    fill(spool, 3, size=100)
    big = spool.append(payload_for(4, 5000))
    fill(spool, 2, size=100)
    sizes = [path.stat().st_size for path in segment_files(spool_dir)]
    assert sizes == [3 * (100 + HEADER_BYTES), 5000 + HEADER_BYTES, 2 * (100 + HEADER_BYTES)]
    assert records(spool, big, max_records=1) == [(4, payload_for(4, 5000))]
    assert numbers(spool) == [1, 2, 3, 4, 5, 6]


def test_a_record_bigger_than_the_cap_is_refused_and_nothing_is_lost(open_spool: Callable[..., Spool]) -> None:
    spool = open_spool(max_bytes=1000)
    fill(spool, 3, size=100)
    with pytest.raises(SpoolError, match="spool_max_bytes"):
        spool.append(b"x" * 1000)
    assert numbers(spool) == [1, 2, 3]
    assert spool.dropped_records == 0
    assert spool.append(b"ok") == 4


# ------------------------------------------------------------------------------------------------------------------
# Write failures


def test_disk_full_at_write_raises_and_keeps_earlier_records(
    open_spool: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool()
    fill(spool, 3)

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SpoolError, match=r"disk full.*spool_max_bytes"):
        spool.append(b"lost")
    monkeypatch.undo()
    assert records(spool) == [(n, payload_for(n)) for n in (1, 2, 3)]
    assert spool.append(b"space is back") == 4


def test_short_write_then_disk_full_leaves_no_half_record(
    open_spool: Callable[..., Spool], spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool()
    fill(spool, 3)
    good = disk_bytes(spool_dir)
    real_write = os.write
    calls: list[int] = []

    def half_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(SpoolError, match="disk full"):
        spool.append(b"y" * 500)
    monkeypatch.undo()
    assert len(calls) == 2  # the short write was followed up, and that one failed
    assert disk_bytes(spool_dir) == spool.bytes == good
    assert spool.append(b"z") == 4
    spool.close()

    spool = open_spool()
    assert spool.truncated_bytes == 0  # nothing torn was left for the restart to find
    assert numbers(spool) == [1, 2, 3, 4]


def test_failed_fsync_is_an_error_and_the_record_is_not_kept(
    open_spool: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = open_spool(fsync="always")
    fill(spool, 2)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(SpoolError, match="I/O error"):
        spool.append(b"unsure")
    monkeypatch.undo()
    assert numbers(spool) == [1, 2]
    assert spool.append(b"sure") == 3


@pytest.mark.parametrize("before", [0, 3])
def test_write_failure_that_cannot_be_cut_back_starts_a_new_segment(
    open_spool: Callable[..., Spool], spool_dir: Path, monkeypatch: pytest.MonkeyPatch, before: int
) -> None:
    spool = open_spool()
    fill(spool, before)
    real_write = os.write
    calls: list[int] = []

    def half_then_eio(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", half_then_eio)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(SpoolError, match="I/O error"):
        spool.append(b"w" * 300)
    monkeypatch.undo()
    assert spool.bytes == disk_bytes(spool_dir)
    assert spool.append(payload_for(before + 1)) == before + 1
    assert len(segment_files(spool_dir)) == (2 if before else 1)  # a segment with no good record is not kept
    assert spool.bytes == disk_bytes(spool_dir)
    spool.close()

    spool = open_spool()
    assert records(spool) == [(n, payload_for(n)) for n in range(1, before + 2)]
    assert spool.corrupt_records == 0


def test_real_full_disk_on_a_tiny_tmpfs(tmp_path: Path) -> None:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
            capture_output=True,
            timeout=WAIT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        spool = Spool(mount_point / "spool", segment_bytes=8192, fsync="always")
        try:
            appended: list[int] = []
            with pytest.raises(SpoolError, match=r"disk full.*No space left on device"):
                for _ in range(200):  # 64 KiB holds far fewer than 200 KiB-sized records
                    appended.append(spool.append(payload_for(spool.next_record_no, 1000)))
            assert len(appended) > 20
            assert records(spool) == [(n, payload_for(n, 1000)) for n in appended]

            half = appended[len(appended) // 2]
            spool.release_through(half)  # the aggregator acknowledged: whole segments go, space is back
            after = spool.append(payload_for(spool.next_record_no, 1000))
            assert after == appended[-1] + 1
            spool.release_through(half + 1)
        finally:
            spool.close()
        with Spool(mount_point / "spool", fsync="always") as spool:
            assert records(spool) == [(n, payload_for(n, 1000)) for n in (*appended, after) if n > half + 1]
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=WAIT_S, check=False)


# ------------------------------------------------------------------------------------------------------------------
# The directory, fsync policies


def test_directory_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SpoolError, match=r"cannot open spool directory .*spool_dir"):
        Spool(tmp_path / "file" / "spool")


def test_one_spool_directory_per_agent(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    first = open_spool()
    with pytest.raises(SpoolError, match="in use by another"):
        Spool(spool_dir)
    first.close()
    open_spool().close()  # the lock goes with the spool


def test_fsync_policies(open_spool: Callable[..., Spool], monkeypatch: pytest.MonkeyPatch) -> None:
    real_fdatasync = os.fdatasync
    synced: list[int] = []

    def counting(fd: int) -> None:
        synced.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    now = [0.0]
    spool = open_spool(fsync="interval", fsync_interval_s=1.0, clock=lambda: now[0])
    fill(spool, 5)
    assert synced == []
    now[0] += 1.5
    fill(spool, 2)
    assert len(synced) == 1
    spool.sync()
    assert len(synced) == 2
    fill(spool, 1)
    spool.close()
    assert len(synced) == 3  # close makes the last ones durable

    synced.clear()
    spool = open_spool(fsync="always")
    fill(spool, 3)
    assert len(synced) == 3


# ------------------------------------------------------------------------------------------------------------------
# Threads


def run_threads(*targets: Callable[[], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(target), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a thread is stuck"
    return errors


def test_writer_and_reader_threads_at_once(open_spool: Callable[..., Spool], spool_dir: Path) -> None:
    spool = open_spool(segment_bytes=2048)
    total = 3000
    seen: list[int] = []
    mixups: list[int] = []

    def writer() -> None:
        for _ in range(total):
            spool.append(payload_for(spool.next_record_no))

    def reader() -> None:
        cursor = 1
        deadline = time.monotonic() + WAIT_S
        while len(seen) < total and time.monotonic() < deadline:
            batch = records(spool, cursor, max_records=37)
            if not batch:
                time.sleep(0.0005)
                continue
            mixups.extend(n for n, payload in batch if payload != payload_for(n))
            seen.extend(n for n, _ in batch)
            cursor = batch[-1][0] + 1
            spool.release_through(batch[-1][0])

    assert run_threads(writer, reader) == []
    assert mixups == []
    assert seen == list(range(1, total + 1))
    assert spool.first_pending is None
    assert len(segment_files(spool_dir)) == 1
    assert spool.bytes == disk_bytes(spool_dir)


def test_reader_while_the_cap_drops_segments(open_spool: Callable[..., Spool]) -> None:
    spool = open_spool(segment_bytes=2048, max_bytes=8192)
    total = 3000
    head_start = threading.Event()
    seen: list[int] = []
    mixups: list[int] = []

    def writer() -> None:
        for i in range(total):
            spool.append(payload_for(spool.next_record_no))
            if i == 500:
                head_start.set()

    def reader() -> None:
        assert head_start.wait(WAIT_S)
        cursor = 1
        deadline = time.monotonic() + WAIT_S
        while (not seen or seen[-1] < total) and time.monotonic() < deadline:
            batch = records(spool, cursor, max_records=10)
            if not batch:
                time.sleep(0.0005)
                continue
            mixups.extend(n for n, payload in batch if payload != payload_for(n))
            seen.extend(n for n, _ in batch)
            cursor = batch[-1][0] + 1
            spool.release_through(batch[-1][0])

    assert run_threads(writer, reader) == []
    assert mixups == []
    assert seen[-1] == total
    assert seen == sorted(set(seen))
    assert spool.dropped_records > 0  # 500 records (60 KiB) were in before the reader started; the cap is 8 KiB
    assert len(seen) + spool.dropped_records >= total


# ------------------------------------------------------------------------------------------------------------------
# Random histories against a model


operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=300)),
        st.tuples(st.just("release"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("reopen"), st.just(b"")),
        st.tuples(st.just("tear"), st.binary(min_size=1, max_size=64)),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(operations)
def test_random_histories_match_a_model(ops: list[tuple[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "spool"
        spool = Spool(directory, segment_bytes=512, fsync="never")
        pending: dict[int, bytes] = {}
        next_no = 1
        try:
            for op, arg in ops:
                if op == "append":
                    assert isinstance(arg, bytes)
                    assert spool.append(arg) == next_no
                    pending[next_no] = arg
                    next_no += 1
                elif op == "release" and pending:
                    assert isinstance(arg, int)
                    through = sorted(pending)[arg % len(pending)]
                    spool.release_through(through)
                    pending = {n: p for n, p in pending.items() if n > through}
                elif op in ("reopen", "tear"):
                    spool.close()
                    segments = segment_files(directory)
                    if op == "tear" and segments:
                        assert isinstance(arg, bytes)
                        with segments[-1].open("ab") as handle:
                            handle.write(arg)  # what an interrupted append leaves behind
                    spool = Spool(directory, segment_bytes=512, fsync="never")
                assert records(spool) == sorted(pending.items())
                assert spool.first_pending == (min(pending) if pending else None)
                assert spool.next_record_no == next_no
                assert spool.bytes == disk_bytes(directory)
                assert spool.corrupt_records == 0
        finally:
            spool.close()
