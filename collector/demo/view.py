"""The demo's output: a live frame redrawn in place with ANSI escapes on a terminal, one plain line per period
otherwise (a pipe, a log, CI). Pure functions of a ``Snapshot`` to text, plus the small writer that redraws."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from typing import TextIO

from collector.demo.telemetry import DeviceLine, Snapshot

HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
ERASE_LINE_END = "\x1b[K"
ERASE_BELOW = "\x1b[J"
BOLD = "\x1b[1m"
DIM = "\x1b[2m"
RESET = "\x1b[0m"
PHASE_ORDER = ("training", "inference", "unknown", "idle")
WAITING = "waiting for the aggregator's request engine"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def joules(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("MJ", 1e6), ("kJ", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.1f} J"


def watts(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} W"


def per_token(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ordered_phases(phases: dict[str, float]) -> list[tuple[str, float]]:
    known = [(name, phases[name]) for name in PHASE_ORDER if name in phases]
    return known + sorted((name, value) for name, value in phases.items() if name not in PHASE_ORDER)


def _workloads(device: DeviceLine) -> str:
    return ", ".join(f"{w} ({phase}) {joules(j)}" for w, phase, j in device.workloads[:2])


def elapsed_text(elapsed_s: float, duration_s: float | None) -> str:
    text = f"{elapsed_s:.0f} s"
    return f"{text} of {duration_s:.0f} s" if duration_s is not None else text


def frame(snap: Snapshot, elapsed_s: float, duration_s: float | None) -> list[str]:
    """The lines of one live frame (ANSI styles, no cursor moves)."""
    lines = [f"{BOLD}wattmeter demo{RESET} · {elapsed_text(elapsed_s, duration_s)} · Ctrl-C stops", ""]
    if not snap.agent_up:
        lines.append("agent: not answering yet")
    else:
        lines.append(f"{BOLD}{'DEVICE':<7} {'MEASURED BY':<12} {'POWER':>7} {'ENERGY':>10}  WORKLOADS{RESET}")
        for device in snap.devices:
            lines.append(
                f"{device.device:<7} {device.what:<12} {watts(device.power_w):>7} {joules(device.energy_j):>10}  "
                f"{_workloads(device)}"
            )
        lines.append("")
        lines.append(f"{BOLD}{'PHASE':<10} {'ENERGY':>10}{RESET}")
        lines.extend(f"{name:<10} {joules(value):>10}" for name, value in _ordered_phases(snap.phases))
    lines.append("")
    source = "energy from the aggregator" if snap.request_api else f"energy: {WAITING}"
    lines.append(f"{BOLD}LAST REQUESTS{RESET} ({snap.served} served; {source})")
    lines.append(
        f"{BOLD}{'REQUEST':<22} {'MODEL':<22} {'IN':>5} {'OUT':>5} {'ENERGY':>10} {'J/TOKEN':>8}  STATUS{RESET}"
    )
    for r in snap.requests:
        lines.append(
            f"{r.request_id[:22]:<22} {r.model[:22]:<22} {r.input_tokens:>5} {r.output_tokens:>5} "
            f"{joules(r.energy_j):>10} {per_token(r.joules_per_output_token):>8}  {r.status}"
        )
    if snap.models:
        lines.append("")
        lines.append(f"{BOLD}{'MODEL':<22} {'REQUESTS':>8} {'ENERGY':>10} {'J/TOKEN':>8}{RESET}")
        for m in snap.models:
            lines.append(
                f"{m.model[:22]:<22} {m.count:>8} {joules(m.energy_j):>10} {per_token(m.joules_per_output_token):>8}"
            )
    return lines


def plain_line(snap: Snapshot, elapsed_s: float, duration_s: float | None, final: bool = False) -> str:
    """One line for a log: devices, phases, requests (``final``: the totals at the end of the run)."""
    parts = [f"demo ran {elapsed_s:.0f} s" if final else f"demo {elapsed_text(elapsed_s, duration_s)}"]
    if snap.agent_up:
        parts.extend(f"{d.device} ({d.what}) {watts(d.power_w)} {joules(d.energy_j)}" for d in snap.devices)
        phases = ", ".join(f"{name} {joules(value)}" for name, value in _ordered_phases(snap.phases))
        parts.append(f"phases: {phases or '-'}")
    else:
        parts.append("agent not answering yet")
    requests = f"requests: {snap.served} served"
    if not snap.request_api:
        requests += f" ({WAITING})"
    else:
        priced = [r for r in snap.requests if r.energy_j is not None]
        if priced:
            last = priced[0]
            requests += (
                f", last priced {last.request_id} {last.model} {last.output_tokens} tokens "
                f"{joules(last.energy_j)} {per_token(last.joules_per_output_token)} J/token ({last.status})"
            )
        else:
            requests += ", none priced yet"
    parts.append(requests)
    return " | ".join(parts)


def fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters (a cut line loses its styles): a line the terminal wrapped would
    take two rows, and the next redraw would back up one row short."""
    visible = ANSI.sub("", line)
    if len(visible) <= width:
        return line
    return visible[: max(0, width - 1)] + "…"


def terminal_size() -> tuple[int, int]:
    """(columns, rows)."""
    size = shutil.get_terminal_size()
    return size.columns, size.lines


class LiveScreen:
    """Redraws a frame in place: back up over the previous frame, rewrite each line, erase what is left below.
    Lines are cut to the terminal's width and the frame to its height, so every line is one row."""

    def __init__(self, out: TextIO, size: Callable[[], tuple[int, int]] = terminal_size) -> None:
        self.out = out
        self.size = size
        self._height = 0

    def draw(self, lines: list[str]) -> None:
        columns, rows = self.size()
        lines = [fit(line, columns) for line in lines[: max(1, rows - 1)]]
        up = f"\x1b[{self._height}F" if self._height else ""
        body = "".join(f"{line}{ERASE_LINE_END}\n" for line in lines)
        self.out.write(f"{HIDE_CURSOR}{up}{body}{ERASE_BELOW}")
        self.out.flush()
        self._height = len(lines)

    def close(self) -> None:
        self.out.write(SHOW_CURSOR)
        self.out.flush()
