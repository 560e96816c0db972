"""Draws each Wattmeter dashboard's panels as Grafana lays them out, from a real Prometheus, to PNGs (matplotlib).

    python deploy/grafana/render.py --prometheus http://localhost:9090 --seconds 3600 --out docs

The README's screenshots come from the end-to-end test's own stack (a real agent with simulated GPUs and a fake RAPL
tree, a real aggregator under request load, Debian's Prometheus):

    WATTMETER_RENDER_DOCS=docs WATTMETER_RENDER_SECONDS=150 pytest tests/deploy/test_dashboards.py -k render

Each panel's targets are the dashboard's own expressions with its variables set to All, as the dashboard opens.
No Grafana is involved: this is what the panels show, not a pixel copy of Grafana.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dashboards  # beside this file, not in a package

BACKGROUND = "#111217"
PANEL = "#181b1f"
TEXT = "#ccccdc"
MUTED = "#8e8e9a"
GRID = "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d",
           "#fade2a", "#3274d9", "#ff9830"]  # fmt: skip
ROW_PX = 30  # Grafana's grid: 24 columns, rows of 30 px
COLUMN_PX = 60
UNITS = {"watt": "W", "kwatth": "kWh", "joule": "J", "masskg": "kg", "reqps": "req/s", "bytes": "B", "s": "s"}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        answer = json.loads(response.read())
    if answer.get("status") != "success":
        raise RuntimeError(f"{url}: {answer}")
    return answer["data"]


def instant(base: str, expr: str, at: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    return list(get_json(f"{base}/api/v1/query?{params}")["result"])


def series(base: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step})
    return list(get_json(f"{base}/api/v1/query_range?{params}")["result"])


def variable_values(base: str, board: dict[str, Any], builtins: dict[str, str]) -> dict[str, str]:
    values: dict[str, str] = {"datasource": "prometheus"}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = dashboards.label_values_query(variable["query"]["query"])
        params = (
            ""
            if selector is None
            else "?" + urllib.parse.urlencode({"match[]": dashboards.expand(selector, values, builtins)})
        )
        found = sorted(value for value in get_json(f"{base}/api/v1/label/{label}/values{params}") if value)
        values[variable["name"]] = dashboards.all_values(found) if found else ".*"
    return values


def legend(template: str, labels: dict[str, str]) -> str:
    if template in ("", "__auto"):
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def human(value: float, unit: str) -> str:
    if math.isnan(value):
        return "no data"
    suffix = UNITS.get(unit, "")
    magnitude = abs(value)
    if unit in ("watt", "joule", "bytes") and magnitude >= 1000:
        for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if magnitude >= scale:
                return f"{value / scale:.3g} {prefix}{suffix}"
    if unit == "none" and value in (0.0, 1.0):
        return f"{value:g}"
    return f"{value:.3g} {suffix}".strip()


def render_dashboard(base: str, path: Path, out: Path, seconds: float, end: float, rate_interval: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter

    board = json.loads(path.read_text())
    builtins = {"$__rate_interval": rate_interval, "$__interval": "5s", "$__range": f"{int(seconds)}s"}
    values = variable_values(base, board, builtins)
    start = end - seconds
    step = max(1.0, seconds / 240)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    width_px, height_px = 24 * COLUMN_PX, rows * ROW_PX + 50
    figure = plt.figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor=BACKGROUND)
    picked = ", ".join(f"{k}: All" for k in values if k != "datasource")
    figure.text(0.01, 1 - 18 / height_px, board["title"], color=TEXT, fontsize=13, weight="bold", va="center")
    figure.text(
        0.99,
        1 - 18 / height_px,
        f"{picked}   last {int(seconds)} s, {datetime.fromtimestamp(end).strftime('%Y-%m-%d %H:%M:%S')}",
        color=MUTED,
        fontsize=8,
        ha="right",
        va="center",
    )
    for panel in board["panels"]:
        grid = panel["gridPos"]
        left = (grid["x"] * COLUMN_PX + 4) / width_px
        top = (grid["y"] * ROW_PX + 40) / height_px
        box = (left, 1 - top - (grid["h"] * ROW_PX - 8) / height_px, (grid["w"] * COLUMN_PX - 8) / width_px,
               (grid["h"] * ROW_PX - 8) / height_px)  # fmt: skip
        frame = figure.add_axes(box, facecolor=PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(GRID)
        frame.text(0.01, 0.97, panel["title"], transform=frame.transAxes, color=TEXT, fontsize=9, va="top")
        inner = (box[0] + 0.045 * box[2], box[1] + 0.12 * box[3], box[2] * 0.93, box[3] * 0.72)
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        exprs = [(dashboards.expand(t["expr"], values, builtins), t["legendFormat"]) for t in panel["targets"]]
        kind = panel["type"]
        if kind in ("timeseries", "heatmap"):
            axes = figure.add_axes(inner, facecolor=PANEL)
            draw_timeseries(axes, base, exprs, start, end, step, unit, kind, panel, DateFormatter)
        else:
            points = [(legend(template, s["metric"]), float(s["value"][1]))
                      for expr, template in exprs for s in instant(base, expr, end)]  # fmt: skip
            if kind == "piechart":
                draw_pie(figure.add_axes(inner, facecolor=PANEL), points, unit)
            elif kind == "bargauge":  # room on the left for the names
                bars = (box[0] + 0.3 * box[2], inner[1], box[2] * 0.58, inner[3])
                draw_bars(figure.add_axes(bars, facecolor=PANEL), points, unit)
            else:
                draw_stat(frame, points, unit, panel)
    target = out / f"dashboard-{board['uid'].removeprefix('wattmeter-')}.png"
    figure.savefig(target, facecolor=BACKGROUND)
    plt.close(figure)
    return target


def style(axes: Any) -> None:
    axes.tick_params(colors=MUTED, labelsize=7)
    axes.grid(color=GRID, linewidth=0.5)
    for spine in axes.spines.values():
        spine.set_visible(False)


def draw_timeseries(axes: Any, base: str, exprs: list[tuple[str, str]], start: float, end: float, step: float,
                    unit: str, kind: str, panel: dict[str, Any], date_formatter: Any) -> None:  # fmt: skip
    style(axes)
    axes.xaxis.set_major_formatter(date_formatter("%H:%M:%S"))
    lines = []
    for expr, template in exprs:
        for result in series(base, expr, start, end, step):
            times = [datetime.fromtimestamp(float(t)) for t, _ in result["values"]]
            lines.append((legend(template, result["metric"]), times, [float(v) for _, v in result["values"]]))
    if kind == "heatmap":
        draw_heatmap(axes, lines)
        return
    stacked = panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode") == "normal"
    if stacked and len(lines) > 1:
        # on one time axis, a series absent at a step counting 0 there (as Grafana stacks it), largest at the bottom
        axis = sorted({t for _, times, _ in lines for t in times})
        filled = []
        for name, times, vals in lines:
            by_time = dict(zip(times, vals, strict=True))
            filled.append((name, [by_time.get(t, 0.0) for t in axis]))
        filled.sort(key=lambda line: -sum(line[1]))
        axes.stackplot(axis, *[vals for _, vals in filled], labels=[name for name, _ in filled], colors=PALETTE,
                       alpha=0.8)  # fmt: skip
    else:
        for index, (name, times, vals) in enumerate(lines):
            axes.plot(times, vals, label=name, color=PALETTE[index % len(PALETTE)], linewidth=1.2)
    axes.set_ylabel(UNITS.get(unit, ""), color=MUTED, fontsize=7)
    if lines:
        axes.legend(loc="upper left", fontsize=6, ncol=min(4, len(lines)), frameon=False, labelcolor=TEXT)
    else:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, color=MUTED, ha="center")


def draw_heatmap(axes: Any, lines: list[tuple[str, list[datetime], list[float]]]) -> None:
    """Buckets (le) as rows, time slots as columns: the count of requests that landed in each bucket."""
    buckets = sorted(lines, key=lambda line: float(line[0]))
    if not buckets:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, color=MUTED, ha="center")
        return
    width = min(len(vals) for _, _, vals in buckets)
    counts, below = [], [0.0] * width
    for _, _, vals in buckets:  # cumulative buckets: each row is its own count, the one below taken off
        counts.append([max(0.0, vals[i] - below[i]) for i in range(width)])
        below = vals[:width]
    used = [i for i, row in enumerate(counts) if any(row)] or [0]
    low, high = max(0, used[0] - 2), min(len(buckets), used[-1] + 3)  # the buckets with requests, and a margin
    buckets, counts = buckets[low:high], counts[low:high]
    axes.imshow(counts, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest")
    axes.set_yticks(range(len(buckets)))
    axes.set_yticklabels([f"≤{human(float(name), 'joule')}" if name != "+Inf" else "+Inf" for name, _, _ in buckets])
    axes.set_xticks([])


def draw_bars(axes: Any, points: list[tuple[str, float]], unit: str) -> None:
    style(axes)
    points = sorted(points, key=lambda p: p[1])[-10:]
    if not points:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, color=MUTED, ha="center")
        return
    names = [name for name, _ in points]
    axes.barh(names, [v for _, v in points], color=[PALETTE[i % len(PALETTE)] for i in range(len(points))])
    for index, (_, value) in enumerate(points):
        axes.text(value, index, " " + human(value, unit), color=TEXT, va="center", fontsize=7)
    axes.margins(x=0.25)


def draw_pie(axes: Any, points: list[tuple[str, float]], unit: str) -> None:
    points = [(name, value) for name, value in points if value > 0]
    if not points:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, color=MUTED, ha="center")
        return
    total = sum(v for _, v in points)
    axes.pie([v for _, v in points], colors=PALETTE, wedgeprops={"width": 0.4, "edgecolor": PANEL},
             labels=[f"{n} {human(v, unit)} ({100 * v / total:.0f}%)" for n, v in points],
             textprops={"color": TEXT, "fontsize": 7})  # fmt: skip


def draw_stat(frame: Any, points: list[tuple[str, float]], unit: str, panel: dict[str, Any]) -> None:
    mapping = {}
    for entry in panel["fieldConfig"]["defaults"].get("mappings", []):
        mapping.update({float(k): v for k, v in entry["options"].items()})
    if not points:
        frame.text(0.5, 0.45, "no data", transform=frame.transAxes, color=MUTED, ha="center", fontsize=12)
        return
    columns = min(len(points), 6)
    for index, (name, value) in enumerate(points[:12]):
        x = (index % columns + 0.5) / columns
        y = 0.55 - 0.35 * (index // columns) if len(points) > 1 else 0.45
        shown = mapping.get(value, {})
        text = shown.get("text") or human(value, unit)
        color = {"red": "#f2495c", "green": "#73bf69"}.get(shown.get("color", ""), "#73bf69")
        size = 20 if len(points) == 1 else 10
        frame.text(x, y, text, transform=frame.transAxes, color=color, ha="center", fontsize=size, weight="bold")
        if len(points) > 1:
            frame.text(x, y - 0.13, name, transform=frame.transAxes, color=MUTED, ha="center", fontsize=6)


def render_all(base: str, out: Path, seconds: float, rate_interval: str = "10s") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    end = time.time()
    return [
        render_dashboard(base, path, out, seconds, end, rate_interval)
        for path in sorted((Path(__file__).resolve().parent / "dashboards").glob("*.json"))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://localhost:9090", help="Prometheus base URL")
    parser.add_argument("--seconds", type=float, default=3600.0, help="time range drawn, ending now")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for the PNGs")
    args = parser.parse_args(argv)
    try:
        for path in render_all(args.prometheus.rstrip("/"), args.out, args.seconds, args.rate_interval):
            print(path)
    except (OSError, RuntimeError) as exc:
        print(f"render: {args.prometheus}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
