"""What the demo's two synthetic workloads share: when to stop, and where they run."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from types import FrameType

PARENT_POLL_S = 0.5


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT, or when the demo that started this process is gone (killed with -9, say):
    a workload never outlives its demo."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()

    def watch_parent() -> None:
        while not stop.wait(PARENT_POLL_S):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    return stop


def placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", type=int, required=True, help="the simulated GPU (0-based) this process runs on")
    parser.add_argument("--load-dir", type=Path, required=True, help="where the demo's agent reads GPU load from")
    parser.add_argument("--seed", type=int, default=None, help="seed the synthetic load (default: random)")
