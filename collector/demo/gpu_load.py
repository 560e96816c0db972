"""The demo's synthetic workloads tell the demo's agent what they run on its simulated GPUs, through files.

A workload process writes ``<dir>/gpu<i>/<pid>.json`` (``{"name", "utilization", "memory_bytes"}``; replaced
atomically) for the simulated GPU it is placed on, and removes it when it stops. The demo's agent reads the files
at every GPU read (``GpuLoadBoard.processes``) and hands them to the simulated source as the GPU's processes, so the
simulated GPU's power follows the load of real processes that the agent resolves like any other (their
registration, their /proc entry). Files are tiny and there are a few of them: reading them at 10 Hz costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from collector.readings import GpuProcess


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GpuLoadBoard:
    """The directory of load files: ``declare``/``withdraw`` on the workload side, ``processes`` on the agent's."""

    def __init__(self, directory: Path, alive: Callable[[int], bool] = pid_alive) -> None:
        self.directory = directory
        self._alive = alive

    def _gpu_dir(self, gpu: int) -> Path:
        return self.directory / f"gpu{gpu}"

    def declare(self, gpu: int, pid: int, name: str, utilization: float, memory_bytes: int) -> None:
        """Process ``pid`` runs on GPU ``gpu`` at ``utilization`` (SM ratio, 0-1), holding ``memory_bytes``."""
        folder = self._gpu_dir(gpu)
        folder.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"name": name, "utilization": utilization, "memory_bytes": memory_bytes})
        temporary = folder / f".{pid}.tmp"
        temporary.write_text(payload)
        os.replace(temporary, folder / f"{pid}.json")

    def withdraw(self, gpu: int, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._gpu_dir(gpu) / f"{pid}.json").unlink()

    def processes(self, gpu: int) -> tuple[GpuProcess, ...]:
        """The live processes declared on ``gpu``; a file that is torn, malformed or of a process gone is skipped."""
        try:
            names = os.listdir(self._gpu_dir(gpu))
        except FileNotFoundError:
            return ()
        found = []
        for file_name in sorted(names):
            stem, _, suffix = file_name.partition(".")
            if suffix != "json" or not stem.isdigit():
                continue
            pid = int(stem)
            try:
                data = json.loads((self._gpu_dir(gpu) / file_name).read_text())
                utilization = min(1.0, max(0.0, float(data["utilization"])))
                memory = max(0, int(data["memory_bytes"]))
                name = str(data["name"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if self._alive(pid):
                found.append(GpuProcess(pid, memory, utilization, name))
        return tuple(found)
