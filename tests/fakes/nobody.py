"""Run a probe as user nobody, so a test sees the permissions a real unprivileged agent would (root reads all)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Probes import what they need first (the interpreter's own files may be unreadable to nobody), then drop().
DROP_TO_NOBODY = """
import os


def drop():
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)

"""


def run_as_nobody(probe: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``probe`` (Python source that calls ``drop()`` after its imports) with ``args`` in ``sys.argv``."""
    return subprocess.run(
        [sys.executable, "-c", DROP_TO_NOBODY + probe, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def open_up(root: Path, file_mode: int) -> None:
    """Directories 0755 and files ``file_mode`` under ``root``, so nobody can reach the files a test locks."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)
