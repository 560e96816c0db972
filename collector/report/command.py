"""``wattmeter report``: energy, CO2 and cost from the aggregator's store, as text, JSON or one HTML file."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from collector.carbon.config import CarbonConfig

EXIT_USAGE = 2


def describe(config: CarbonConfig | None) -> str:
    """How intensity and price are given, for the report's header."""
    carbon = config or CarbonConfig()
    if carbon.csv is not None:
        what = f"CSV series {carbon.csv}"
    elif carbon.hourly_g_per_kwh is not None or carbon.monthly_g_per_kwh:
        what = f"hourly profile in {carbon.timezone}" + (" (by month)" if carbon.monthly_g_per_kwh else "")
    else:
        what = f"constant {carbon.intensity_g_per_kwh:g} g/kWh"
    if config is None:
        what += " (the default: no [carbon] section in the aggregator config)"
    return what


def parse_time(value: str, now_ns: int) -> int:
    """``7d`` (that long ago), or an ISO 8601 time with an offset, to Unix ns."""
    from collector.aggregator.config import parse_duration

    try:
        return now_ns - int(parse_duration(value) * 1e9)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a duration (7d, 12h) nor an ISO 8601 time (2027-01-15T00:00Z)"
        ) from None
    if stamp.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset: add Z or +01:00")
    return int(stamp.timestamp() * 1e9)


def schema_problem(version: int, url: str) -> str | None:
    """Why a store whose schema is at ``version`` cannot be reported on by this wattmeter, or None when it can."""
    from collector.store.migrations import LATEST_VERSION
    from collector.store.urls import redact

    if version == LATEST_VERSION:
        return None
    if version == 0:
        return f"{redact(url)} holds no wattmeter data (no schema): check --storage or the config's [storage] url"
    if version < LATEST_VERSION:
        return (
            f"the store's schema is version {version}, older than this wattmeter's {LATEST_VERSION}: start this "
            "version's aggregator on it once (it migrates the store), then run the report again"
        )
    return (
        f"the store's schema is version {version}, newer than this wattmeter's {LATEST_VERSION}: upgrade wattmeter "
        "to the version that wrote it"
    )


def cmd_report(args: argparse.Namespace) -> int:
    from collector.aggregator.config import load_aggregator_config, parse_duration
    from collector.carbon.series import series_from_config
    from collector.config import env_config_path
    from collector.errors import ConfigError
    from collector.report.data import build_report
    from collector.report.html import render_html
    from collector.report.render import render_json, render_text
    from collector.store import open_store
    from collector.store.base import StoreError, StoreMissing

    now_ns = time.time_ns()
    try:
        since_ns = parse_time(args.since, now_ns)
        until_ns = parse_time(args.until, now_ns) if args.until else now_ns
        window_s = parse_duration(args.window)
    except ValueError as exc:
        print(f"wattmeter report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if until_ns <= since_ns:
        print("wattmeter report: --until must be after --since", file=sys.stderr)
        return EXIT_USAGE
    for pattern in args.flexible or ():
        try:
            re.compile(pattern)
        except re.error as exc:
            print(
                f"wattmeter report: --flexible {pattern!r} is not a regular expression ({exc}): "
                "fix it, or quote it so the shell passes it whole",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        # the report serves nothing: a loopback listen keeps a file without [grpc] TLS valid here
        config = load_aggregator_config(args.config or env_config_path(), {"grpc": {"listen": "127.0.0.1:0"}})
        series = series_from_config(config.carbon or CarbonConfig())
    except ConfigError as exc:
        print(f"wattmeter report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    url = args.storage or config.storage.url
    try:
        store = open_store(url, create=False)  # a report reads the store as it is: it creates and migrates nothing
        try:
            problem = schema_problem(store.schema_version(), url)
            if problem is not None:
                print(f"wattmeter report: {problem}", file=sys.stderr)
                return EXIT_USAGE
            report = build_report(
                store,
                series,
                since_ns,
                until_ns,
                by=args.by,
                window_s=window_s,
                flexible=args.flexible or (),
                intensity=describe(config.carbon),
            )
        finally:
            store.close()
    except StoreMissing as exc:
        print(f"wattmeter report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"wattmeter report: storage: {exc}", file=sys.stderr)
        return 1
    rendered = {"text": render_text, "json": render_json, "html": render_html}[args.format](report)
    if args.output is None:
        sys.stdout.write(rendered)
        return 0
    try:
        args.output.write_text(rendered, encoding="utf-8")
    except OSError as exc:
        print(f"wattmeter report: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    report = sub.add_parser(
        "report", help="energy, CO2 and cost from the aggregator's store; the shift advisor; power-cap evidence"
    )
    report.add_argument("--since", default="7d", help="a duration ago (7d, 12h) or an ISO time; default 7d")
    report.add_argument("--until", default=None, help="a duration ago or an ISO time; default now")
    report.add_argument("--by", choices=["workload", "phase", "model", "host"], default="workload")
    report.add_argument("--format", choices=["text", "json", "html"], default="text")
    report.add_argument("--output", type=Path, default=None, help="write to this file instead of stdout")
    report.add_argument("--storage", default=None, help="store URL (default: the aggregator config's [storage] url)")
    report.add_argument(
        "--config",
        type=Path,
        default=None,
        help="aggregator TOML config: its [storage] and [carbon] (default: $WATTMETER_CONFIG, else "
        "/etc/wattmeter/aggregator.toml if present)",
    )
    report.add_argument("--window", default="24h", help="shift advisor: work moves only within windows this long")
    report.add_argument(
        "--flexible",
        action="append",
        metavar="REGEX",
        help="workload names the advisor may move, besides phase training and workloads labelled flexible=true "
        "(repeatable)",
    )
    report.set_defaults(func=cmd_report)
