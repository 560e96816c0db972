"""The report as text (a terminal or a mail) and as JSON (for other tools)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any

from collector.report.data import Amount, GroupRow, Report


def when(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def money(value: float | None, currency: str) -> str:
    return "-" if value is None else f"{value:,.2f} {currency}"


def trend(now: float, before: float | None) -> str:
    if before is None:
        return "new"
    if before == 0:
        return "-" if now == 0 else "new"
    return f"{(now - before) / before * 100:+.1f}%"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows
    ]
    return out


def group_table(rows: list[GroupRow], currency: str, total_kwh: float, with_phase: bool = False) -> list[str]:
    headers = ["name", *(["phase"] if with_phase else []), "kWh", "kg CO2e", "cost", "share", "kWh vs previous"]
    body = []
    for row in rows:
        share = f"{row.now.kwh / total_kwh * 100:.1f}%" if total_kwh > 0 else "-"
        body.append(
            [
                row.name,
                *([row.phase] if with_phase else []),
                f"{row.now.kwh:.3f}",
                f"{row.now.kg:.3f}",
                money(row.now.cost, currency),
                share,
                trend(row.now.kwh, row.previous.kwh if row.previous else None),
            ]
        )
    return table(headers, body)


def amount_line(label: str, amount: Amount, currency: str) -> str:
    return f"{label}: {amount.kwh:.3f} kWh, {amount.kg:.3f} kg CO2e, cost {money(amount.cost, currency)}"


def render_text(report: Report) -> str:
    c = report.currency
    out = [
        f"Wattmeter report {when(report.since_ns)} to {when(report.until_ns)} (by {report.by})",
        f"intensity: {report.intensity}; PUE {report.pue:g}",
        "",
        "## Totals",
        amount_line("this period", report.total, c),
        amount_line("previous period", report.previous_total, c),
        f"trend: energy {trend(report.total.kwh, report.previous_total.kwh)}, "
        f"CO2 {trend(report.total.kg, report.previous_total.kg)}",
        *report.notes,
        "",
        f"## By {report.by}",
    ]
    if report.groups_note:
        out.append(report.groups_note)
    out += group_table(report.groups, c, report.total.kwh) if report.groups else ["(nothing in the period)"]
    out += ["", "## Training vs inference"]
    out += group_table(report.phases, c, report.total.kwh) if report.phases else ["(no workload energy)"]
    out += ["", "## Top workloads"]
    out += (
        group_table(report.top_workloads, c, report.total.kwh, with_phase=True) if report.top_workloads else ["(none)"]
    )
    out += ["", "## Energy per request"]
    if report.models:
        out += table(*model_table(report))
    else:
        out.append(report.models_note)
    out += ["", "## Shift advisor", *shift_lines(report)]
    out += ["", "## Power-cap evidence", *power_lines(report)]
    return "\n".join(out) + "\n"


SHIFT_MODEL = (
    "Model: each flexible workload's hourly energy blocks may move to other hours of the same window, one block per "
    "hour (same hours of work, same peak power); the largest blocks go to the cleanest hours."
)


def flexible_lines(report: Report) -> list[str]:
    """The workloads the advisor may move, and why."""
    if not report.flexible:
        return []
    return ["flexible workloads:", *(f"  {f.name}: {', '.join(f.reasons)}" for f in report.flexible)]


def shift_lines(report: Report) -> list[str]:
    shift = report.shift
    window_h = shift.window_s / 3600
    out = [f"window {window_h:g} h, {shift.windows} whole windows in the period", *flexible_lines(report)]
    if shift.reason:
        return [*out, shift.reason, *shift.notes]
    out.append(SHIFT_MODEL)
    out += table(
        ["workload", "kWh", "kg now", "kg shifted", "kg saved", "cost saved", "moves"],
        [
            [
                w.workload,
                f"{w.energy_kwh:.3f}",
                f"{w.actual_kg:.3f}",
                f"{w.shifted_kg:.3f}",
                f"{w.saved_kg:.3f}",
                money(w.saved_cost, report.currency),
                str(len(w.moves)),
            ]
            for w in shift.workloads
        ],
    )
    out.append(f"total saved: {shift.saved_kg:.3f} kg CO2e, cost {money(shift.saved_cost, report.currency)}")
    for w in shift.workloads:
        for move in w.moves[:24]:
            out.append(
                f"  {w.workload}: {move.energy_kwh:.3f} kWh from {when(move.from_ns)} "
                f"({move.from_g_per_kwh:.0f} g/kWh) to {when(move.to_ns)} ({move.to_g_per_kwh:.0f} g/kWh)"
            )
        if len(w.moves) > 24:
            out.append(f"  {w.workload}: {len(w.moves) - 24} more moves (see --format json)")
    return [*out, *shift.notes]


POWER_NOTE = (
    "Evidence, not a change: requests of each model in quartiles of their mean power (J over duration). If lower-power "
    "quartiles show no more J per token, a power cap may save energy at little cost; Wattmeter changes no cap."
)


STEP_NOTE = (
    "Training steps (collector.client.step()): J per step is the workload's energy in the hours it stepped over its "
    "steps; mean W and steps/s are over the minutes it stepped. Quartiles of those hours by mean W, where there are "
    "8 or more: if lower-power hours show no more J per step, a cap may save energy at little cost."
)


def _optional(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def step_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the training steps' evidence: one row per workload, then one per power quartile."""
    headers = ["workload", "phase", "steps", "J/step", "GPU J/step", "mean W", "steps/s", "kWh"]
    rows = []
    for s in report.step_power:
        rows.append(
            [
                f"{s.host}/{s.workload}" + (f" (job {s.job})" if s.job else ""),
                s.phase,
                str(s.steps),
                _optional(s.joules_per_step, ".2f"),
                _optional(s.gpu_joules_per_step, ".2f"),
                f"{s.mean_w:.1f}",
                f"{s.steps_per_s:.3f}",
                f"{s.energy_kwh:.4f}",
            ]
        )
        for b in s.bins:
            rows.append(
                [
                    f"  power quartile {b.quartile} ({b.hours} h)",
                    "",
                    "",
                    f"{b.joules_per_step:.2f}",
                    "",
                    f"{b.mean_w:.1f}",
                    f"{b.steps_per_s:.3f}",
                    "",
                ]
            )
    return headers, rows


def model_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Energy per request by model: headers and rows, for the text and HTML reports."""
    headers = ["model", "requests", "kWh", "J/request p50", "p95", "J/output token", "kg CO2e"]
    rows = [
        [
            m.model,
            str(m.requests),
            f"{m.energy_kwh:.4f}",
            f"{m.p50_j:.1f}",
            f"{m.p95_j:.1f}",
            _optional(m.joules_per_output_token, ".3f"),
            _optional(m.kg, ".4f"),
        ]
        for m in report.models
    ]
    return headers, rows


POWER_BIN_HEADERS = ["model", "power quartile", "requests", "mean W", "J/request median", "J/output token"]


def power_bin_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """The power-cap evidence per model and power quartile: headers and rows, for the text and HTML reports."""
    rows = [
        [
            b.model,
            str(b.quartile),
            str(b.requests),
            f"{b.mean_w:.1f}",
            f"{b.median_j_per_request:.1f}",
            "-" if b.joules_per_output_token is None else f"{b.joules_per_output_token:.3f}",
        ]
        for b in report.power_bins
    ]
    return POWER_BIN_HEADERS, rows


def power_lines(report: Report) -> list[str]:
    out = [POWER_NOTE]
    if report.power_bins:
        out += table(*power_bin_table(report))
        if report.power_note:  # the quartiles come from the newest requests only
            out.append(f"requests: {report.power_note}")
    else:
        out.append(f"requests: {report.power_note or 'too few requests per model (8 needed) to compare'}")
    out.append(STEP_NOTE)
    if report.step_power:
        out += table(*step_table(report))
    else:
        out.append(f"steps: {report.step_note}")
    if report.training_power:
        out.append("training on GPUs without steps in the store (energy and mean power only):")
        out += table(
            ["workload", "GPU kWh", "hours running", "mean W"],
            [[t.workload, f"{t.gpu_kwh:.3f}", str(t.hours_running), f"{t.mean_w:.1f}"] for t in report.training_power],
        )
    return out


def to_json(report: Report) -> dict[str, Any]:
    data = dataclasses.asdict(report)
    data["since"] = when(report.since_ns)
    data["until"] = when(report.until_ns)
    data["shift"]["saved_kg"] = report.shift.saved_kg
    data["shift"]["saved_cost"] = report.shift.saved_cost
    return data


def render_json(report: Report) -> str:
    return json.dumps(to_json(report), indent=2) + "\n"
