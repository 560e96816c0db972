"""``wattmeter requests show ID | top | summary``: energy per request, read from the aggregator's HTTP API.

It asks the API (``/api/v1/requests/{id}``, ``/api/v1/requests``, ``/api/v1/summary``) over HTTP with the standard
library only, so it runs wherever that API is reachable. ``--format table`` (the default) is for people: joules with
SI prefixes, times in UTC; ``json`` and ``csv`` carry raw joules and Unix ns for scripts. A failure is one line on
stderr: exit 1 when the aggregator cannot be reached, answers an error or does not know the request, 2 when it
refuses the command's parameters or credentials.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

DEFAULT_URL = "http://127.0.0.1:9752"
URL_ENV = "WATTMETER_AGGREGATOR_URL"
PASSWORD_ENV = "WATTMETER_AGGREGATOR_PASSWORD"
TIMEOUT_S = 30.0
EXIT_FAILED = 1
EXIT_USAGE = 2
_PREFIXES = {-3: "n", -2: "µ", -1: "m", 0: "", 1: "k", 2: "M", 3: "G", 4: "T"}
CSV_REQUEST_COLUMNS = (
    "request_id", "status", "model", "tenant", "hosts", "start_ns", "end_ns", "input_tokens", "output_tokens",
    "active_j", "full_j", "gpu_j", "cpu_j", "dram_j", "joules_per_output_token",
)  # fmt: skip
CSV_SUMMARY_COLUMNS = ("count", "energy_j", "p50_j", "p95_j", "output_tokens", "joules_per_output_token")


class CommandError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- display


def si(value: float | None, unit: str) -> str:
    """``41.2 J``, ``1.3 kJ``, ``250 mJ``: three significant digits and an SI prefix; ``-`` when unknown."""
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return f"0 {unit}"
    power = max(min(math.floor(math.log10(abs(value)) / 3), max(_PREFIXES)), min(_PREFIXES))
    scaled = value / 1000.0**power
    if abs(float(f"{scaled:.3g}")) >= 1000 and power < max(_PREFIXES):  # 999.6 J rounds to 1.00 kJ
        power += 1
        scaled = value / 1000.0**power
    return f"{scaled:.3g} {_PREFIXES[power]}{unit}"


def utc(ns: int) -> str:
    if ns <= 0:
        return "-"
    moment = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def duration(start_ns: int, end_ns: int) -> str:
    if start_ns <= 0 or end_ns < start_ns:
        return "-"
    return f"{(end_ns - start_ns) / 1e9:.3g} s"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Columns padded to their widest cell; those in ``right`` (numbers) aligned right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def show_table(request: dict[str, Any]) -> str:
    energy = request["energy_j"]
    per_token = request["joules_per_output_token"]
    lines = [
        ("request", request["request_id"]),
        ("status", request["status"]),
        ("model", request["model"] or "-"),
        ("tenant", request["tenant"] or "-"),
        ("hosts", ", ".join(request["hosts"]) or "-"),
        ("start", utc(request["start_ns"])),
        ("duration", duration(request["start_ns"], request["end_ns"])),
        ("tokens", f"{request['input_tokens']} in, {request['output_tokens']} out"),
    ]
    if energy["active"] is None:
        why = "not computed yet" if request["status"] == "pending" else "unknown: no samples for its time"
        lines.append(("energy", why))
    else:
        lines += [
            ("energy", f"{si(energy['active'], 'J')} active, {si(energy['full'], 'J')} full"),
            ("parts", f"{si(energy['gpu'], 'J')} GPU, {si(energy['cpu'], 'J')} CPU, {si(energy['dram'], 'J')} DRAM"),
            ("per token", "-" if per_token is None else f"{si(per_token, 'J')} per output token"),
        ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in lines)


def top_table(requests: Sequence[dict[str, Any]]) -> str:
    header = ("REQUEST", "MODEL", "TENANT", "STATUS", "START", "TIME", "OUT TOK", "ACTIVE", "FULL", "PER TOKEN")
    rows = [
        (
            r["request_id"],
            r["model"] or "-",
            r["tenant"] or "-",
            r["status"],
            utc(r["start_ns"]),
            duration(r["start_ns"], r["end_ns"]),
            str(r["output_tokens"]),
            si(r["energy_j"]["active"], "J"),
            si(r["energy_j"]["full"], "J"),
            si(r["joules_per_output_token"], "J"),
        )
        for r in requests
    ]
    return table(header, rows, right={5, 6, 7, 8, 9})


def summary_table(by: str, groups: Sequence[dict[str, Any]]) -> str:
    header = (by.upper(), "REQUESTS", "ENERGY", "P50", "P95", "OUT TOK", "PER TOKEN")
    rows = [
        (
            g["group"] or "-",
            str(g["count"]),
            si(g["energy_j"], "J"),
            si(g["p50_j"], "J"),
            si(g["p95_j"], "J"),
            str(g["output_tokens"]),
            si(g["joules_per_output_token"], "J"),
        )
        for g in groups
    ]
    return table(header, rows, right={1, 2, 3, 4, 5, 6})


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # every digit: csv is for scripts
    return value


def write_csv(out: IO[str], header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    import csv

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_csv_value(value) for value in row] for row in rows])


def request_csv_row(r: dict[str, Any]) -> list[Any]:
    energy = r["energy_j"]
    return [
        r["request_id"], r["status"], r["model"], r["tenant"], ";".join(r["hosts"]), r["start_ns"], r["end_ns"],
        r["input_tokens"], r["output_tokens"], energy["active"], energy["full"], energy["gpu"], energy["cpu"],
        energy["dram"], r["joules_per_output_token"],
    ]  # fmt: skip


# -- HTTP


class Api:
    """GETs JSON from the aggregator's API at ``url`` (credentials in it, or ``user``: NAME or NAME:PASSWORD)."""

    def __init__(self, url: str, user: str | None, cacert: str | None, timeout_s: float) -> None:
        from urllib.parse import unquote, urlsplit

        try:
            parts = urlsplit(url.strip())
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in 0..65535
        except ValueError as exc:
            raise CommandError(
                f"--url {url!r} is not a valid address: {exc} (for example {DEFAULT_URL})", EXIT_USAGE
            ) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CommandError(
                f"--url {url!r} is not an http:// or https:// address (for example {DEFAULT_URL})", EXIT_USAGE
            )
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise CommandError(f"--timeout {timeout_s} is not a positive number of seconds", EXIT_USAGE)
        self.display = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
        self.timeout_s = timeout_s
        self.cacert = cacert
        username, password = (unquote(parts.username), unquote(parts.password or "")) if parts.username else ("", "")
        if user:
            username, _, given = user.partition(":")
            password = given if ":" in user else _password(username)
        self.authorization = ""
        if username:
            import base64

            self.authorization = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    def get(self, path: str, params: dict[str, str | int] | None = None) -> Any:
        import http.client
        import ssl
        import urllib.error
        import urllib.request
        from urllib.parse import urlencode

        query = {name: value for name, value in (params or {}).items() if value not in (None, "")}
        # a command-line argument that is not UTF-8 (surrogate escapes) travels as its bytes
        url = self.display + path + ("?" + urlencode(query, errors="surrogateescape") if query else "")
        headers = {"Accept": "application/json"}
        if self.authorization:
            headers["Authorization"] = self.authorization
        context = None
        if url.startswith("https:"):
            try:
                context = ssl.create_default_context(cafile=self.cacert)
            except (OSError, ssl.SSLError) as exc:
                raise CommandError(f"cannot read --cacert {self.cacert}: {exc}", EXIT_USAGE) from None
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=self.timeout_s, context=context
            ) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            raise self._refused(exc.code, exc.read()) from None
        except http.client.InvalidURL as exc:
            raise CommandError(
                f"--url {self.display!r} is not a valid address: {exc} (for example {DEFAULT_URL})", EXIT_USAGE
            ) from None
        except http.client.HTTPException as exc:
            raise CommandError(
                f"{self.display} did not answer HTTP ({type(exc).__name__}): is it the aggregator's HTTP address?"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CommandError(
                f"cannot reach the aggregator at {self.display}: {reason}; start it, or point --url "
                f"(or ${URL_ENV}) at its HTTP address"
            ) from None
        try:
            return json.loads(body)
        except ValueError:
            raise CommandError(
                f"{self.display}{path} did not answer JSON: is it the aggregator's HTTP address?"
            ) from None

    def _refused(self, status: int, body: bytes) -> CommandError:
        try:
            reason = str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            reason = body.decode(errors="replace").strip() or f"HTTP {status}"
        if status == 401:
            return CommandError(
                f"the aggregator at {self.display} wants credentials: give --user NAME:PASSWORD "
                "(or NAME, with the password in $" + PASSWORD_ENV + ")",
                EXIT_USAGE,
            )
        if status == 400:
            return CommandError(reason, EXIT_USAGE)
        if status == 404 and reason == "not found":
            return CommandError(f"{self.display} has no request API: is it a wattmeter aggregator of this version?")
        return CommandError(reason if status == 404 else f"the aggregator answered HTTP {status}: {reason}")


def _password(username: str) -> str:
    password = os.environ.get(PASSWORD_ENV)
    if password is not None:
        return password
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"password for {username}: ")
    raise CommandError(f"--user {username} has no password: give NAME:PASSWORD or set ${PASSWORD_ENV}", EXIT_USAGE)


# -- commands


def _api(args: argparse.Namespace) -> Api:
    return Api(args.url or os.environ.get(URL_ENV) or DEFAULT_URL, args.user, args.cacert, args.timeout)


def _show(args: argparse.Namespace, out: IO[str]) -> None:
    from urllib.parse import quote

    if not args.request_id:
        raise CommandError("the request ID is empty: give one (wattmeter requests top lists some)", EXIT_USAGE)
    request = _api(args).get("/api/v1/requests/" + quote(args.request_id, safe="", errors="surrogateescape"))
    if args.format == "json":
        print(json.dumps(request, indent=2, ensure_ascii=False), file=out)
    elif args.format == "csv":
        write_csv(out, CSV_REQUEST_COLUMNS, [request_csv_row(request)])
    else:
        print(show_table(request), file=out)


def _top(args: argparse.Namespace, out: IO[str]) -> None:
    params: dict[str, str | int] = {"limit": args.limit, "order": args.sort, "since": args.since}
    if args.until:
        params["until"] = args.until
    if args.model:
        params["model"] = args.model
    answer = _api(args).get("/api/v1/requests", params)
    requests = answer["requests"]
    if args.format == "json":
        print(json.dumps(answer, indent=2, ensure_ascii=False), file=out)
    elif args.format == "csv":
        write_csv(out, CSV_REQUEST_COLUMNS, [request_csv_row(r) for r in requests])
    elif not requests:
        print(f"no requests from {utc(answer['since_ns'])} to {utc(answer['until_ns'])}", file=out)
    else:
        print(top_table(requests), file=out)


def _summary(args: argparse.Namespace, out: IO[str]) -> None:
    params: dict[str, str | int] = {"by": args.by, "since": args.since}
    if args.until:
        params["until"] = args.until
    answer = _api(args).get("/api/v1/summary", params)
    groups = answer["groups"]
    if args.format == "json":
        print(json.dumps(answer, indent=2, ensure_ascii=False), file=out)
    elif args.format == "csv":
        write_csv(
            out, (args.by, *CSV_SUMMARY_COLUMNS), [[g["group"], *(g[c] for c in CSV_SUMMARY_COLUMNS)] for g in groups]
        )
    elif not groups:
        print(f"no finished requests from {utc(answer['since_ns'])} to {utc(answer['until_ns'])}", file=out)
    else:
        print(summary_table(args.by, groups), file=out)


def cmd_requests(args: argparse.Namespace) -> int:
    try:
        args.action(args, sys.stdout)
    except CommandError as exc:
        print(f"wattmeter: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyError, TypeError) as exc:  # an answer without the fields this version reads
        print(f"wattmeter: the aggregator's answer is not what this wattmeter expects ({exc!r})", file=sys.stderr)
        return EXIT_FAILED
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        help=f"the aggregator's HTTP address (default: ${URL_ENV}, else {DEFAULT_URL}); may hold user:password@",
    )
    common.add_argument("--user", help=f"NAME:PASSWORD for basic auth (NAME alone: the password from ${PASSWORD_ENV})")
    common.add_argument("--cacert", help="CA certificate to trust for an https:// aggregator")
    common.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait for an answer")
    common.add_argument("--format", choices=["table", "json", "csv"], default="table")

    requests = sub.add_parser("requests", help="energy per request, from the aggregator's API")
    actions = requests.add_subparsers(dest="requests_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", parents=[common], help="one request: status, tokens, joules, J per token")
    show.add_argument("request_id", metavar="ID")
    show.set_defaults(func=cmd_requests, action=_show)

    top = actions.add_parser("top", parents=[common], help="the requests that cost the most energy (or the newest)")
    top.add_argument("--limit", type=int, default=10, help="how many (default 10)")
    top.add_argument("--model", help="only this model's")
    top.add_argument("--since", default="1h", help="Unix ns or a duration ago: 90s, 15m, 1h, 7d (default 1h)")
    top.add_argument("--until", help="Unix ns or a duration ago (default: now)")
    top.add_argument("--sort", choices=["energy", "start"], default="energy", help="most active J, or newest start")
    top.set_defaults(func=cmd_requests, action=_top)

    summary = actions.add_parser(
        "summary", parents=[common], help="per model, tenant or host: requests, joules, p50/p95, J per output token"
    )
    summary.add_argument("--by", choices=["model", "tenant", "host"], default="model")
    summary.add_argument("--since", default="1h", help="Unix ns or a duration ago: 90s, 15m, 1h, 7d (default 1h)")
    summary.add_argument("--until", help="Unix ns or a duration ago (default: now)")
    summary.set_defaults(func=cmd_requests, action=_summary)
