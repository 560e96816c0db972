"""The report as one self-contained HTML file: inline CSS and SVG charts, no script, nothing fetched."""

from __future__ import annotations

from html import escape

from collector.report.data import GroupRow, Report
from collector.report.render import (
    POWER_NOTE,
    SHIFT_MODEL,
    STEP_NOTE,
    model_table,
    money,
    power_bin_table,
    step_table,
    trend,
    when,
)

SECTIONS = ("totals", "groups", "phases", "top-workloads", "requests", "shift", "power-cap", "hourly")
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}h2{margin-top:1.5em;border-bottom:1px solid #ddd}.note{color:#555}
"""
COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bar_chart(title: str, items: list[tuple[str, float]], unit: str) -> str:
    """Horizontal bars, one per item, labelled with name and value."""
    if not items:
        return ""
    top = max(value for _, value in items) or 1.0
    row_h, label_w, bar_w = 22, 180, 360
    height = row_h * len(items) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 120}" height="{height}" role="img">',
        f"<title>{escape(title)}</title>",
        f'<text x="0" y="14" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (name, value) in enumerate(items):
        y = 24 + i * row_h
        width = max(1.0, value / top * bar_w)
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{escape(name[:28])}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{width:.1f}" height="{row_h - 6}" fill="{COLOURS[i % len(COLOURS)]}"/>'
        )
        parts.append(f'<text x="{label_w + width + 4:.1f}" y="{y + 14}" font-size="12">{value:.3f} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def hourly_chart(kwh: list[float], grams: list[float]) -> str:
    """Energy per hour as bars and intensity per hour as a line on its own scale."""
    if not kwh:
        return ""
    width, height, pad = 720, 200, 30
    step = (width - 2 * pad) / len(kwh)
    top_e = max(kwh) or 1.0
    top_g = max(grams) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" role="img">',
        "<title>Energy (bars, kWh) and grid intensity (line, g/kWh) per hour</title>",
    ]
    for i, value in enumerate(kwh):
        h = value / top_e * height
        parts.append(
            f'<rect x="{pad + i * step:.2f}" y="{pad + height - h:.2f}" width="{max(step * 0.9, 0.5):.2f}" '
            f'height="{h:.2f}" fill="#4e79a7"/>'
        )
    points = " ".join(
        f"{pad + (i + 0.5) * step:.2f},{pad + height - g / top_g * height:.2f}" for i, g in enumerate(grams)
    )
    parts.append(f'<polyline points="{points}" fill="none" stroke="#e15759" stroke-width="1.5"/>')
    parts.append(
        f'<text x="{pad}" y="16" font-size="12">bars: kWh per hour (max {top_e:.3f}); '
        f"line: g CO2e/kWh (max {top_g:.0f})</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _group_rows(rows: list[GroupRow], currency: str, total_kwh: float, with_phase: bool = False) -> str:
    headers = ["name", *(["phase"] if with_phase else []), "kWh", "kg CO2e", "cost", "share", "kWh vs previous"]
    body = [
        [
            r.name,
            *([r.phase] if with_phase else []),
            f"{r.now.kwh:.3f}",
            f"{r.now.kg:.3f}",
            money(r.now.cost, currency),
            f"{r.now.kwh / total_kwh * 100:.1f}%" if total_kwh > 0 else "-",
            trend(r.now.kwh, r.previous.kwh if r.previous else None),
        ]
        for r in rows
    ]
    return _table(headers, body)


def _section(name: str, title: str, body: str) -> str:
    return f'<section id="{name}"><h2>{escape(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>' if text else ""


def render_html(report: Report) -> str:
    c = report.currency
    total, previous = report.total, report.previous_total
    totals = _table(
        ["period", "kWh", "kg CO2e", "cost"],
        [
            ["this period", f"{total.kwh:.3f}", f"{total.kg:.3f}", money(total.cost, c)],
            ["previous period", f"{previous.kwh:.3f}", f"{previous.kg:.3f}", money(previous.cost, c)],
            ["trend", trend(total.kwh, previous.kwh), trend(total.kg, previous.kg), ""],
        ],
    ) + "".join(_note(n) for n in report.notes)
    groups = (
        _note(report.groups_note)
        + bar_chart(f"kg CO2e by {report.by}", [(g.name, g.now.kg) for g in report.groups[:12]], "kg")
        + (_group_rows(report.groups, c, total.kwh) if report.groups else _note("nothing in the period"))
    )
    phases = bar_chart("kWh by phase", [(g.name, g.now.kwh) for g in report.phases], "kWh") + (
        _group_rows(report.phases, c, total.kwh) if report.phases else _note("no workload energy")
    )
    top = _group_rows(report.top_workloads, c, total.kwh, with_phase=True) if report.top_workloads else _note("none")
    requests = _table(*model_table(report)) if report.models else _note(report.models_note)
    shift = report.shift
    shift_html = _note(f"window {shift.window_s / 3600:g} h, {shift.windows} whole windows in the period")
    if report.flexible:
        shift_html += _table(["flexible workload", "why"], [[f.name, ", ".join(f.reasons)] for f in report.flexible])
    if shift.reason:
        shift_html += f"<p><strong>{escape(shift.reason)}</strong></p>"
    else:
        shift_html += _note(SHIFT_MODEL) + _table(
            ["workload", "kWh", "kg now", "kg shifted", "kg saved", "cost saved"],
            [
                [
                    w.workload,
                    f"{w.energy_kwh:.3f}",
                    f"{w.actual_kg:.3f}",
                    f"{w.shifted_kg:.3f}",
                    f"{w.saved_kg:.3f}",
                    money(w.saved_cost, c),
                ]
                for w in shift.workloads
            ],
        )
        shift_html += (
            f"<p><strong>saved: {shift.saved_kg:.3f} kg CO2e, cost {escape(money(shift.saved_cost, c))}</strong></p>"
        )
        moves = [
            [
                w.workload,
                f"{m.energy_kwh:.3f}",
                when(m.from_ns),
                f"{m.from_g_per_kwh:.0f}",
                when(m.to_ns),
                f"{m.to_g_per_kwh:.0f}",
            ]
            for w in shift.workloads
            for m in w.moves[:200]
        ]
        shift_html += "<h3>Schedule</h3>" + _table(["workload", "kWh", "from", "g/kWh", "to", "g/kWh"], moves)
    shift_html += "".join(_note(n) for n in shift.notes)
    power = _note(POWER_NOTE)
    if report.power_bins:
        power += _table(*power_bin_table(report))
        if report.power_note:  # the quartiles come from the newest requests only
            power += _note(f"requests: {report.power_note}")
    else:
        power += _note(f"requests: {report.power_note or 'too few requests per model (8 needed) to compare'}")
    power += _note(STEP_NOTE)
    power += _table(*step_table(report)) if report.step_power else _note(f"steps: {report.step_note}")
    if report.training_power:
        power += _note("training on GPUs without steps in the store (energy and mean power only)")
        power += _table(
            ["workload", "GPU kWh", "hours running", "mean W"],
            [[t.workload, f"{t.gpu_kwh:.3f}", str(t.hours_running), f"{t.mean_w:.1f}"] for t in report.training_power],
        )
    title = f"Wattmeter report {when(report.since_ns)} to {when(report.until_ns)}"
    body = "".join(
        [
            f"<h1>{escape(title)}</h1>",
            _note(f"intensity: {report.intensity}; PUE {report.pue:g}; grouped by {report.by}"),
            _section("totals", "Totals", totals),
            _section("groups", f"By {report.by}", groups),
            _section("phases", "Training vs inference", phases),
            _section("top-workloads", "Top workloads", top),
            _section("requests", "Energy per request", requests),
            _section("shift", "Shift advisor", shift_html),
            _section("power-cap", "Power-cap evidence", power),
            _section(
                "hourly", "Energy and intensity per hour", hourly_chart(report.hourly_kwh, report.hourly_g_per_kwh)
            ),
        ]
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )
