"""(informational) The agent spool's costs: append per record (1 KiB payloads) under each fsync policy, replay per
record, and bytes on disk per record beyond the payload.

``python -m bench.spool [--dir DIR]`` prints the figures. The spool lives in a temporary directory under ``DIR``
(default: the system temp dir); fsync="always" measures that filesystem's fdatasync, so run it on the disk the agent
will use (``/var/lib/wattmeter``) for a figure that means something.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from collector.spool import FsyncPolicy, Spool

PAYLOAD_BYTES = 1024
NEVER_RECORDS = 50_000
ALWAYS_RECORDS = 1_000
ALWAYS_MAX_S = 10.0  # stop early on a slow disk: the per-record figure needs a few hundred syncs, not all of them
REPEATS = 3  # median of these, against noise from other processes


def _append_us(directory: Path, fsync: FsyncPolicy, records: int, max_s: float | None = None) -> tuple[float, int]:
    """Microseconds per append and the spool's bytes after it, in a fresh spool."""
    payload = bytes(range(256)) * (PAYLOAD_BYTES // 256)
    with tempfile.TemporaryDirectory(dir=directory) as tmp, Spool(Path(tmp) / "spool", fsync=fsync) as spool:
        started = time.perf_counter()
        done = 0
        while done < records:
            spool.append(payload)
            done += 1
            if max_s is not None and done % 50 == 0 and time.perf_counter() - started > max_s:
                break
        elapsed = time.perf_counter() - started
        return elapsed / done * 1e6, spool.bytes // done


def _replay_us(directory: Path, records: int) -> float:
    """Microseconds per record to read a spool back from the start (an agent catching up after an outage)."""
    payload = b"x" * PAYLOAD_BYTES
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        with Spool(Path(tmp) / "spool", fsync="never") as spool:
            for _ in range(records):
                spool.append(payload)
        with Spool(Path(tmp) / "spool", fsync="never") as spool:  # reopened: sealed segments are scanned lazily
            started = time.perf_counter()
            count = sum(1 for _ in spool.read_from(0))
            elapsed = time.perf_counter() - started
    if count != records:
        raise RuntimeError(f"replay returned {count} records, {records} were appended")
    return elapsed / records * 1e6


def run(directory: Path | None = None) -> dict[str, float]:
    where = Path(directory or tempfile.gettempdir())
    never = [_append_us(where, "never", NEVER_RECORDS) for _ in range(REPEATS)]
    interval = [_append_us(where, "interval", NEVER_RECORDS) for _ in range(REPEATS)]
    always = _append_us(where, "always", ALWAYS_RECORDS, ALWAYS_MAX_S)
    replay = [_replay_us(where, NEVER_RECORDS) for _ in range(REPEATS)]
    return {
        "append_us_per_record_fsync_never": round(statistics.median(us for us, _ in never), 2),
        "append_us_per_record_fsync_interval_1s": round(statistics.median(us for us, _ in interval), 2),
        "append_us_per_record_fsync_always": round(always[0], 1),
        "replay_us_per_record": round(statistics.median(replay), 2),
        "disk_bytes_per_record_beyond_payload": float(never[0][1] - PAYLOAD_BYTES),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spool", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to put the spool (default: the temp dir)")
    args = parser.parse_args(argv)
    figures = run(args.dir)
    print(f"spool benchmark, {PAYLOAD_BYTES}-byte payloads, in {args.dir or tempfile.gettempdir()}")
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value:g}")


if __name__ == "__main__":
    main()
