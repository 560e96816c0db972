"""The agent's on-disk spool: a durable FIFO of opaque byte records (serialized batches; never parsed here).

Files in the spool directory (mode 0700, ``flock``'ed while open so two agents never share it):

- ``<number>.seg``: segments, named by the 20-digit number of their first record. Records go into the last one (the
  active segment) in number order; a new segment starts when the active one would pass ``segment_bytes``.
- ``state.json``: ``{"format": 1, "released_through": N, "next_record_no": M}``, replaced atomically (written to
  ``state.json.tmp``, renamed) when the release watermark moves, so a restart does not replay released records.

A record is a 24-byte header and the payload; integers little-endian::

    offset  size  field
    0       4     magic b"WSR1"
    4       4     payload length in bytes
    8       8     record number (1, 2, 3... across restarts)
    16      4     crc32 of the payload
    20      4     crc32 of header bytes 0-19

The header has its own checksum so that damage costs as little as possible: a bad payload still has a trusted length
and only that record is lost, and after a bad header the scan finds the next record by its magic and a header
checksum that holds (resync).

Recovery. At open the active segment is scanned: bytes after its last valid record are a torn tail (a write cut short
by kill -9 or power loss, or garbage): they are logged, cut off (truncate) and never returned, and appends continue
after the last good record (a torn record's number is given again). Records missing between valid ones are corrupt:
skipped and counted in ``corrupt_records``. Sealed segments are scanned the first time they are read (a full 1 GiB
spool opens by reading one segment); there, records missing anywhere are counted as corrupt.

Durability (``fsync``): "always" fdatasyncs each record before ``append`` returns, and the directory when a segment
is created; "interval" fdatasyncs at an append when ``fsync_interval_s`` has passed since the last sync, and at
``sync()`` and ``close()``; "never" leaves it to the kernel (records survive kill -9, not power loss).

Threads: one thread appends while another reads and releases. The lock guards only bookkeeping; writes, fsyncs and
reads run outside it. A reader opens segments by path, so a segment deleted under it stays readable until it is done.
The active segment is only ever deleted by the writer, which is why ``release_through`` leaves it in place.
"""

from __future__ import annotations

import bisect
import builtins
import errno
import fcntl
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from collector.errors import WattmeterError

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "interval", "never"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = ("always", "interval", "never")

MAGIC = b"WSR1"
HEADER_BYTES = 24  # per-record overhead on disk
MAX_PAYLOAD_BYTES = 0xFFFF_FFFF
STATE_FORMAT = 1
STATE_FILE = "state.json"
DROP_LOG_INTERVAL_S = 60.0
_READ_CHUNK_BYTES = 1 << 20  # one pread per chunk of consecutive records when reading
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_PREFIX = struct.Struct("<4sIQI")  # magic, length, record number, payload crc: the bytes the header crc covers
_CRC = struct.Struct("<I")
_HEADER = struct.Struct("<4sIQII")


class SpoolError(WattmeterError):
    """The spool cannot do what was asked (disk full, I/O error, unusable directory); the message says how to fix it."""


def segment_name(first_record_no: int) -> str:
    return f"{first_record_no:020d}.seg"


def encode_record(record_no: int, payload: builtins.bytes) -> builtins.bytes:
    """One record as it is written to a segment: header and payload."""
    prefix = _PREFIX.pack(MAGIC, len(payload), record_no, zlib.crc32(payload))
    return b"".join((prefix, _CRC.pack(zlib.crc32(prefix)), payload))


def _record_at(view: memoryview, pos: int, after: int, before: int | None) -> tuple[int, int] | None:
    """(record number, payload length) of a valid record at ``pos`` numbered in (after, before), or None."""
    if pos + HEADER_BYTES > len(view):
        return None
    magic, length, record_no, payload_crc, header_crc = _HEADER.unpack_from(view, pos)
    if magic != MAGIC or zlib.crc32(view[pos : pos + _PREFIX.size]) != header_crc:
        return None
    if record_no <= after or (before is not None and record_no >= before):
        return None
    stop = pos + HEADER_BYTES + length
    if stop > len(view) or zlib.crc32(view[pos + HEADER_BYTES : stop]) != payload_crc:
        return None
    return record_no, length


@dataclass
class SegmentScan:
    """The valid records found in one segment's bytes."""

    numbers: array[int]
    offsets: array[int]
    lengths: array[int]
    good_end: int  # offset just past the last valid record: the rest is a torn tail (active segment)
    missing: int  # record numbers absent between the valid ones (and before ``before``, when given): corrupt


def scan_segment(data: builtins.bytes, first: int, before: int | None) -> SegmentScan:
    """Find the valid records in ``data``, a segment whose records are numbered from ``first`` (and below ``before``,
    the next segment's first, for a sealed segment). Damage is stepped over by searching for the next magic."""
    view = memoryview(data)
    found = SegmentScan(array("Q"), array("Q"), array("I"), 0, 0)
    last = first - 1
    pos = 0
    while pos < len(data):
        record = _record_at(view, pos, last, before)
        if record is None:
            pos = data.find(MAGIC, pos + 1)
            if pos < 0:
                break
            continue
        record_no, length = record
        found.missing += record_no - last - 1
        found.numbers.append(record_no)
        found.offsets.append(pos)
        found.lengths.append(length)
        last = record_no
        pos += HEADER_BYTES + length
        found.good_end = pos
    if before is not None:
        found.missing += before - 1 - last
    return found


def _write_error(exc: OSError, path: Path, what: str) -> SpoolError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that filesystem or lower [stream] spool_max_bytes"
        return SpoolError(f"spool disk full: cannot {what} {path} ({reason}); {fix}; records already spooled are kept")
    if exc.errno == errno.EROFS:
        fix = "remount it read-write or point [stream] spool_dir at a writable directory"
        return SpoolError(f"spool on a read-only filesystem: cannot {what} {path}; {fix}")
    if exc.errno == errno.EIO:
        return SpoolError(f"spool I/O error: cannot {what} {path} ({reason}); the disk may be failing, check dmesg")
    return SpoolError(f"spool: cannot {what} {path} ({reason})")


@dataclass(eq=False)
class _Segment:
    first: int
    path: Path
    size: int  # bytes on disk, as far as published
    indexed: bool  # numbers/offsets/lengths are known (a sealed segment from before the restart: not until read)
    numbers: array[int] = field(default_factory=lambda: array("Q"))
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    lengths: array[int] = field(default_factory=lambda: array("I"))
    gone: bool = False  # deleted (dropped, released, vanished): a scan or read of it in flight must not publish


@dataclass
class _ReadPlan:
    segment: _Segment
    numbers: list[int]
    offsets: list[int]
    lengths: list[int]


class Spool:
    """A durable FIFO queue of byte records in ``directory``; see the module docstring for the format and rules.

    ``max_bytes`` caps the segments' bytes on disk: past it the oldest segments go (their unreleased records counted in
    ``dropped_records``), never the one being written. A record bigger than ``segment_bytes`` gets a segment of its own;
    one bigger than ``max_bytes`` is refused. ``clock`` (monotonic seconds) paces the interval fsync and the drop log.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 8 << 20,
        fsync: FsyncPolicy = "always",
        fsync_interval_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= HEADER_BYTES:
            raise ValueError(f"spool max_bytes must be more than {HEADER_BYTES}, got {max_bytes}")
        if segment_bytes <= 0:
            raise ValueError(f"spool segment_bytes must be positive, got {segment_bytes}")
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"spool fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if fsync_interval_s < 0:
            raise ValueError(f"spool fsync_interval_s must be >= 0, got {fsync_interval_s}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync: FsyncPolicy = fsync
        self.fsync_interval_s = fsync_interval_s
        self._clock = clock
        self._lock = threading.Lock()  # bookkeeping: segments, counters, watermark
        self._scan_lock = threading.Lock()  # one lazy scan of a sealed segment at a time
        self._state_lock = threading.Lock()  # one state file write at a time
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # segments' first numbers, for bisect
        self._bytes = 0
        self._released = 0
        self._next = 1
        self._dropped = 0
        self._corrupt = 0
        self._truncated_bytes = 0
        self._fd: int | None = None  # the active segment (self._segments[-1]), opened for append
        self._broken = False  # the active segment holds bytes that could not be cut off: start a new one
        self._last_sync = clock()
        self._drop_logged_at: float | None = None
        self._drops_unlogged = 0
        self._state_logged_at: float | None = None
        self._closed = False
        self._dir_fd = self._open_directory()
        try:
            self._recover()
        except OSError as exc:
            self._close_fds()
            raise SpoolError(f"cannot recover the spool in {self.directory}: {exc}") from exc
        except BaseException:
            self._close_fds()
            raise

    # ----------------------------------------------------------------------------------------------------------
    # Opening

    def _open_directory(self) -> int:
        where = f"spool directory {self.directory}"
        fix = "point [stream] spool_dir at a directory the agent can write"
        try:
            if not self.directory.exists():
                self.directory.mkdir(mode=0o700, parents=True)
                os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask
            dir_fd = os.open(self.directory, _DIR_FLAGS)
        except OSError as exc:
            raise SpoolError(f"cannot open {where}: {exc.strerror or exc}; {fix}") from exc
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(dir_fd)
            raise SpoolError(
                f"{where} is in use by another wattmeter agent; give each agent its own [stream] spool_dir"
            ) from None
        except OSError as exc:
            os.close(dir_fd)
            raise SpoolError(f"cannot lock {where}: {exc.strerror or exc}") from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            os.close(dir_fd)
            raise SpoolError(f"{where} is not writable (permissions or a read-only filesystem); {fix}")
        return dir_fd

    def _recover(self) -> None:
        released, next_floor = self._load_state()
        self._released = released
        found: list[tuple[int, Path]] = []
        for entry in os.scandir(self.directory):
            match = _SEGMENT_NAME.match(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                found.append((int(match.group(1)), Path(entry.path)))
        found.sort()
        (self.directory / (STATE_FILE + ".tmp")).unlink(missing_ok=True)  # a state write cut short
        self._next = max(next_floor, released + 1, found[-1][0] if found else 1)
        for i, (first, path) in enumerate(found[:-1]):
            if found[i + 1][0] - 1 <= released:  # every record in it was released before the restart
                path.unlink()
                continue
            self._add_segment(_Segment(first, path, path.stat().st_size, indexed=False))
        if found:
            self._recover_active(*found[-1])
        if self._segments and not self._segments[-1].indexed:
            # the last segment held no record and is gone; the one before is last now, and reading and first_pending
            # rely on the last segment being indexed (its end is not the next segment's first)
            last = self._segments[-1]
            self._publish_scan(last, scan_segment(last.path.read_bytes(), last.first, self._next))

    def _load_state(self) -> tuple[int, int]:
        path = self.directory / STATE_FILE
        try:
            state = json.loads(path.read_bytes())
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError(f"not a format {STATE_FORMAT} spool state")
            released, next_no = state["released_through"], state["next_record_no"]
            if not (isinstance(released, int) and isinstance(next_no, int) and 0 <= released < next_no):
                raise ValueError("bad numbers")
        except FileNotFoundError:
            return 0, 1
        except (OSError, ValueError, KeyError) as exc:
            log.warning(
                "spool state %s is unreadable (%s): starting from the segments, so released records may be sent "
                "again (the aggregator drops duplicates)",
                path,
                exc,
            )
            return 0, 1
        return released, next_no

    def _recover_active(self, first: int, path: Path) -> None:
        try:
            data = path.read_bytes()
            scan = scan_segment(data, first, None)
            if not scan.numbers:  # empty, or only a torn first record: start afresh at the next number
                path.unlink()
                if data:
                    self._log_torn(path, len(data))
                return
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise _write_error(exc, path, "recover spool segment") from exc
        self._fd = fd
        size = len(data)
        if scan.good_end < size:
            try:
                os.ftruncate(fd, scan.good_end)
                if self.fsync != "never":
                    os.fdatasync(fd)
            except OSError as exc:
                raise _write_error(exc, path, "cut the torn tail off") from exc
            self._log_torn(path, size - scan.good_end)
            size = scan.good_end
        segment = _Segment(first, path, size, True, scan.numbers, scan.offsets, scan.lengths)
        self._add_segment(segment)
        self._note_corrupt(segment, scan.missing)
        self._next = max(self._next, scan.numbers[-1] + 1)

    def _log_torn(self, path: Path, cut: int) -> None:
        self._truncated_bytes += cut
        log.warning("spool: cut %d bytes of a torn record off the end of %s (a write was interrupted)", cut, path)

    def _add_segment(self, segment: _Segment) -> None:
        self._segments.append(segment)
        self._firsts.append(segment.first)
        self._bytes += segment.size

    # ----------------------------------------------------------------------------------------------------------
    # Appending (one thread)

    def append(self, payload: builtins.bytes) -> int:
        """Add one record; returns its number once it is as durable as the fsync policy says."""
        size = HEADER_BYTES + len(payload)
        if len(payload) > MAX_PAYLOAD_BYTES or size > self.max_bytes:
            raise SpoolError(
                f"a {len(payload)}-byte batch cannot fit in the spool (cap {self.max_bytes} bytes); "
                "raise [stream] spool_max_bytes or lower [stream] max_batch_bytes"
            )
        with self._lock:
            self._check_open()
            self._make_room(size)
            segment = self._segments[-1]
            fd = self._fd
            record_no = self._next
            offset = segment.size
        assert fd is not None  # _make_room leaves an active segment open
        record = encode_record(record_no, payload)
        try:
            written = os.write(fd, record)
            while written < size:  # a short write: the disk filled up mid-record; the next write says why
                more = os.write(fd, memoryview(record)[written:])
                if more == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += more
            self._sync_after_write(fd)
        except OSError as exc:
            self._cut_back(fd, segment, offset)
            raise _write_error(exc, segment.path, f"write a {size}-byte record to") from exc
        with self._lock:
            segment.numbers.append(record_no)
            segment.offsets.append(offset)
            segment.lengths.append(len(payload))
            segment.size = offset + size
            self._bytes += size
            self._next = record_no + 1
        return record_no

    def _sync_after_write(self, fd: int) -> None:
        if self.fsync == "always":
            os.fdatasync(fd)
        elif self.fsync == "interval":
            now = self._clock()
            if now - self._last_sync >= self.fsync_interval_s:
                os.fdatasync(fd)
                self._last_sync = now

    def _cut_back(self, fd: int, segment: _Segment, offset: int) -> None:
        """Remove what a failed append left after ``offset``, so that no later record follows half of one."""
        try:
            os.ftruncate(fd, offset)
            return
        except OSError as exc:
            log.error(
                "spool: cannot cut a failed write off %s (%s); the next record starts a new segment", segment.path, exc
            )
        with self._lock:
            self._broken = True
            try:
                actual = os.fstat(fd).st_size
            except OSError:
                return
            self._bytes += actual - segment.size
            segment.size = actual

    def _make_room(self, size: int) -> None:
        """Under the lock: an active segment with room for ``size`` more bytes, the cap kept by dropping old ones."""
        active = self._segments[-1] if self._segments else None
        if (
            self._fd is None
            or self._broken
            or active is None
            or (active.size > 0 and active.size + size > self.segment_bytes)
        ):
            self._roll()
        while self._bytes + size > self.max_bytes:
            if len(self._segments) > 1:
                self._drop_oldest()
            elif self._segments[-1].size > 0:
                self._roll()
            else:
                break

    def _roll(self) -> None:
        """Under the lock: seal the active segment and start a new one named by the next record number."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self.fsync != "never" and not self._broken:
                    os.fdatasync(fd)
            except OSError as exc:
                raise _write_error(exc, self._segments[-1].path, "sync") from exc
            finally:
                os.close(fd)
        if self._segments and not self._segments[-1].numbers:  # no record in it (only a failed write): nothing to keep
            empty = self._segments[-1]
            try:
                empty.path.unlink(missing_ok=True)
            except OSError as exc:
                raise _write_error(exc, empty.path, "delete spool segment") from exc
            self._remove(len(self._segments) - 1)
        path = self.directory / segment_name(self._next)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _write_error(exc, path, "create spool segment") from exc
        self._add_segment(_Segment(self._next, path, 0, indexed=True))
        self._fd = fd
        self._broken = False
        if self.fsync == "always":
            self._sync_directory()

    def _sync_directory(self) -> None:
        try:
            os.fsync(self._dir_fd)
        except OSError as exc:
            raise _write_error(exc, self.directory, "sync the spool directory") from exc

    def _drop_oldest(self) -> None:
        """Under the lock: delete the oldest segment for the cap, counting its unreleased records."""
        segment = self._segments[0]
        lost = self._unreleased_in(segment, self._segments[1].first)
        try:
            segment.path.unlink(missing_ok=True)
        except OSError as exc:
            raise _write_error(exc, segment.path, "delete old spool segment") from exc
        self._remove(0)
        if lost:
            self._note_dropped(lost)

    def _unreleased_in(self, segment: _Segment, before: int) -> int:
        if segment.indexed:
            return len(segment.numbers) - bisect.bisect_right(segment.numbers, self._released)
        return max(0, before - max(segment.first, self._released + 1))

    def _remove(self, index: int) -> _Segment:
        segment = self._segments.pop(index)
        del self._firsts[index]
        self._bytes -= segment.size
        segment.gone = True
        return segment

    def _note_dropped(self, lost: int) -> None:
        self._dropped += lost
        self._drops_unlogged += lost
        now = self._clock()
        if self._drop_logged_at is None or now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
            log.warning(
                "spool %s is full (cap %d bytes): dropped the %d oldest unsent batches (%d since start); "
                "the aggregator is unreachable or slow, or [stream] spool_max_bytes is too small",
                self.directory,
                self.max_bytes,
                self._drops_unlogged,
                self._dropped,
            )
            self._drop_logged_at = now
            self._drops_unlogged = 0

    def _note_corrupt(self, segment: _Segment, missing: int) -> None:
        if missing > 0:
            self._corrupt += missing
            log.error(
                "spool: %d corrupt records in %s skipped (checksum mismatch); they are lost", missing, segment.path
            )

    def sync(self) -> None:
        """Make every appended record durable now (for the "interval" and "never" policies)."""
        with self._lock:
            fd = self._fd
            path = self._segments[-1].path if self._segments else self.directory
            if fd is None:
                return
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise _write_error(exc, path, "sync") from exc
            self._last_sync = self._clock()

    # ----------------------------------------------------------------------------------------------------------
    # Reading and releasing (another thread)

    def read_from(self, record_no: int, max_records: int | None = None) -> Iterator[tuple[int, builtins.bytes]]:
        """(number, payload) of the records numbered ``record_no`` or more, oldest first, that are neither released
        nor dropped; at most ``max_records``. Records appended while iterating are included."""
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0, got {max_records}")
        return self._iter_records(record_no, max_records)

    def _iter_records(self, cursor: int, remaining: int | None) -> Iterator[tuple[int, builtins.bytes]]:
        while remaining is None or remaining > 0:
            step = self._plan(cursor, remaining)
            if step is None:
                return
            if isinstance(step, _Segment):
                self._index(step)
                continue
            records = self._read(step)
            yield from records
            cursor = step.numbers[-1] + 1
            if remaining is not None:
                remaining -= len(records)

    def _plan(self, cursor: int, remaining: int | None) -> _ReadPlan | _Segment | None:
        """Under the lock: the next consecutive records from ``cursor`` to read, or a segment to scan first."""
        with self._lock:
            if self._closed:
                return None
            cursor = max(cursor, self._released + 1)
            start = max(0, bisect.bisect_right(self._firsts, cursor) - 1)
            for i in range(start, len(self._segments)):
                segment = self._segments[i]
                if not segment.indexed:
                    return segment
                numbers = segment.numbers
                j = bisect.bisect_left(numbers, cursor)
                if j == len(numbers):
                    continue
                limit = len(numbers) if remaining is None else min(len(numbers), j + remaining)
                offsets, lengths = segment.offsets, segment.lengths
                k = j + 1
                while k < limit and offsets[k] + HEADER_BYTES + lengths[k] - offsets[j] <= _READ_CHUNK_BYTES:
                    k += 1
                return _ReadPlan(segment, list(numbers[j:k]), list(offsets[j:k]), list(lengths[j:k]))
            return None

    def _read(self, plan: _ReadPlan) -> list[tuple[int, builtins.bytes]]:
        """The plan's records, each checked again; a record damaged since it was indexed is counted and skipped."""
        start = plan.offsets[0]
        stop = plan.offsets[-1] + HEADER_BYTES + plan.lengths[-1]
        try:
            fd = os.open(plan.segment.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget_vanished(plan.segment)
            return []
        except OSError as exc:
            raise _write_error(exc, plan.segment.path, "read spool segment") from exc
        try:
            data = os.pread(fd, stop - start, start)
        except OSError as exc:
            raise _write_error(exc, plan.segment.path, "read spool segment") from exc
        finally:
            os.close(fd)
        view = memoryview(data)
        records: list[tuple[int, builtins.bytes]] = []
        bad: list[int] = []
        for record_no, offset, length in zip(plan.numbers, plan.offsets, plan.lengths, strict=True):
            pos = offset - start
            if _record_at(view, pos, record_no - 1, record_no + 1) == (record_no, length):
                records.append((record_no, data[pos + HEADER_BYTES : pos + HEADER_BYTES + length]))
            else:
                bad.append(record_no)
        if bad:
            self._forget_records(plan.segment, bad)
        return records

    def _forget_records(self, segment: _Segment, bad: list[int]) -> None:
        with self._lock:
            if segment.gone:
                return
            for record_no in bad:
                j = bisect.bisect_left(segment.numbers, record_no)
                if j < len(segment.numbers) and segment.numbers[j] == record_no:
                    del segment.numbers[j], segment.offsets[j], segment.lengths[j]
            self._note_corrupt(segment, len(bad))

    def _forget_vanished(self, segment: _Segment) -> None:
        """A segment file deleted behind the spool's back: its records are lost."""
        with self._lock:
            if segment.gone:
                return  # dropped or released meanwhile: nothing is missing
            index = self._segments.index(segment)
            before = self._segments[index + 1].first if index + 1 < len(self._segments) else self._next
            lost = self._unreleased_in(segment, before)
            log.error("spool: segment %s vanished (deleted by something else); %d records lost", segment.path, lost)
            self._corrupt += lost
            if index + 1 < len(self._segments):
                self._remove(index)
            else:  # the active one: stop appending to the deleted file and forget its records
                self._broken = True
                segment.numbers, segment.offsets, segment.lengths = array("Q"), array("Q"), array("I")

    def _index(self, segment: _Segment) -> None:
        """Scan a sealed segment from before the restart, the first time it is read."""
        with self._scan_lock:
            with self._lock:
                if segment.indexed or segment.gone:
                    return
                before = self._segments[self._segments.index(segment) + 1].first
            try:
                data = segment.path.read_bytes()
            except FileNotFoundError:
                self._forget_vanished(segment)
                return
            except OSError as exc:
                raise _write_error(exc, segment.path, "read spool segment") from exc
            scan = scan_segment(data, segment.first, before)
            with self._lock:
                if not segment.gone:
                    self._publish_scan(segment, scan)

    def _publish_scan(self, segment: _Segment, scan: SegmentScan) -> None:
        segment.numbers, segment.offsets, segment.lengths = scan.numbers, scan.offsets, scan.lengths
        segment.indexed = True
        self._note_corrupt(segment, scan.missing)

    def release_through(self, record_no: int) -> None:
        """Records numbered ``record_no`` or less are acknowledged: forget them, delete the segments that held only
        them (never the active one), and persist the watermark so that a restart does not replay them."""
        with self._lock:
            self._check_open()
            if record_no >= self._next:
                raise ValueError(f"cannot release record {record_no}: the last one appended is {self._next - 1}")
            if record_no <= self._released:
                return
            self._released = record_no
            done = []
            while len(self._segments) > 1 and self._segments[1].first <= record_no + 1:
                done.append(self._remove(0))
        for segment in done:  # before the state is written: on a full disk, this is what makes room for it
            try:
                segment.path.unlink(missing_ok=True)
            except OSError as exc:  # deleted at the next start, once the state says they are released
                log.warning("spool: cannot delete released segment %s: %s", segment.path, exc)
        self._write_state()

    def _write_state(self) -> None:
        """Persist the watermark: write a temporary file, rename it over the old one. A failure only means that a
        restart sends some released records again, which the aggregator drops as duplicates: logged, not raised."""
        with self._state_lock:
            with self._lock:
                state = {"format": STATE_FORMAT, "released_through": self._released, "next_record_no": self._next}
            path = self.directory / STATE_FILE
            tmp = path.with_name(STATE_FILE + ".tmp")
            data = json.dumps(state).encode()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    if os.write(fd, data) != len(data):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    if self.fsync != "never":
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                if self.fsync == "always":
                    os.fsync(self._dir_fd)
            except OSError as exc:
                now = self._clock()
                if self._state_logged_at is None or now - self._state_logged_at >= DROP_LOG_INTERVAL_S:
                    self._state_logged_at = now
                    log.warning(
                        "%s (after a restart some acknowledged batches may be sent again)",
                        _write_error(exc, path, "save the spool state"),
                    )

    # ----------------------------------------------------------------------------------------------------------
    # State

    @property
    def first_pending(self) -> int | None:
        """The lowest record number neither released nor dropped, None when there is none."""
        with self._lock:
            for i, segment in enumerate(self._segments):
                if segment.indexed:
                    j = bisect.bisect_right(segment.numbers, self._released)
                    if j < len(segment.numbers):
                        return segment.numbers[j]
                else:
                    lowest = max(segment.first, self._released + 1)
                    if lowest < self._segments[i + 1].first:
                        return lowest
            return None

    @property
    def next_record_no(self) -> int:
        """The number the next append will get."""
        return self._next

    @property
    def dropped_records(self) -> int:
        """Unreleased records deleted for the cap since open."""
        return self._dropped

    @property
    def corrupt_records(self) -> int:
        """Records lost to damage (checksum mismatch) found since open; torn tails are not counted."""
        return self._corrupt

    @property
    def truncated_bytes(self) -> int:
        """Bytes of torn records cut off the active segment at open."""
        return self._truncated_bytes

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.directory} is closed")

    def close(self) -> None:
        """Sync (unless fsync is "never") and close; call it after the appending thread has stopped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._fd is not None and self.fsync != "never":
                    os.fdatasync(self._fd)
            except OSError as exc:
                log.error("spool: cannot sync %s at close: %s", self._segments[-1].path, exc)
            finally:
                self._close_fds()

    def _close_fds(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._dir_fd)  # also releases the directory lock

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes(self) -> int:
        """Bytes of segments on disk now (wattmeter_stream_spool_bytes)."""
        return self._bytes
