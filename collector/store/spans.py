"""Request spans, process bindings and per-request results, in SQL that SQLite and PostgreSQL both run.

``RequestSql`` holds the statements for one dialect; its methods run inside a transaction the caller holds (a
store call of its own, or the group write of batches whose spans and bindings commit with them).

Spans are written in one multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` per ``ROWS_PER_STATEMENT``
spans: what comes back is exactly the spans that were new, and only their requests become pending, in one multi-row
upsert. A request's row keeps, while pending, what its spans say (model, tenant, hosts, times, tokens) so the API
can show it; the engine's result replaces it unless a span arrived after the engine read them (``span_count``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import fields, replace
from operator import attrgetter
from typing import Any, Literal, TypeVar, get_args

import numpy as np

from collector.store.base import (
    ProcessBindingRow,
    RequestResult,
    RequestStatus,
    RequestSummaryRow,
    SpanKey,
    SpanRow,
)
from collector.store.dialect import Dialect
from collector.store.writes import Cursor, Refs, _chunks, _insert, _marks

HostKey = tuple[str]
RequestOrder = Literal["start", "energy"]
STATUSES = frozenset(get_args(RequestStatus))
SUMMARY_COLUMN = {"model": "model", "tenant": "tenant", "host": "hosts"}

_SPAN_COLUMNS = (
    "request_id, span_id, start_ns, end_ns, workload, pid, service_name, model, tenant, input_tokens, "
    "output_tokens, queue_end_ns, prefill_end_ns, received_ns, host_ref, labels"
)
# the span's fields in _SPAN_COLUMNS' order, less the host id and labels (one C call per span)
_span_fields = attrgetter(
    "request_id", "span_id", "start_ns", "end_ns", "workload", "pid", "service_name", "model", "tenant",
    "input_tokens", "output_tokens", "queue_end_ns", "prefill_end_ns", "received_ns",
)  # fmt: skip
_SPAN_ROW = "(" + ", ".join(["?"] * 16) + ")"
_SELECT_SPANS = (
    "SELECT s.request_id, s.span_id, h.hostname, s.start_ns, s.end_ns, s.workload, s.pid, s.service_name, s.model, "
    "s.tenant, s.input_tokens, s.output_tokens, s.queue_end_ns, s.prefill_end_ns, s.labels, s.received_ns "
    "FROM spans s JOIN span_hosts h ON h.id = s.host_ref"
)
_REQUEST_COLUMNS = (
    "request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, output_tokens, active_j, full_j, "
    "gpu_j, cpu_j, dram_j, span_count, updated_ns"
)
_REQUEST_ROW = "(" + ", ".join(["?"] * 16) + ")"
_SELECT_REQUESTS = f"SELECT {_REQUEST_COLUMNS} FROM requests"


class HostRefs(Refs[HostKey]):
    def __init__(self) -> None:
        super().__init__("span_hosts", ("hostname",))


def text(value: str) -> str:
    """``value`` storable on both backends: PostgreSQL cannot hold NUL in text, so NUL becomes U+FFFD everywhere (a
    span that failed its transaction would fail its batch's, and the agent would send that batch forever)."""
    return value.replace("\0", "\ufffd") if "\0" in value else value


def _has_nul(span: SpanRow) -> bool:
    # spelled out: 0.16 us a span, against 1.5 for any() over the fields
    return (
        "\0" in span.request_id
        or "\0" in span.span_id
        or "\0" in span.hostname
        or "\0" in span.workload
        or "\0" in span.service_name
        or "\0" in span.model
        or "\0" in span.tenant
    )


_Row = TypeVar("_Row", SpanRow, ProcessBindingRow)


def _without_nul(row: _Row) -> _Row:
    """``row`` with every text field through ``text`` (labels are JSON, which escapes NUL itself)."""
    changes: dict[str, Any] = {f.name: text(getattr(row, f.name)) for f in fields(row) if f.type == "str"}
    return replace(row, **changes)


def labels_text(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, ensure_ascii=False, separators=(",", ":")) if labels else "{}"


def hosts_text(hosts: Iterable[str]) -> str:
    return json.dumps(sorted({text(host) for host in hosts}), ensure_ascii=False, separators=(",", ":"))


class RequestSql:
    def __init__(self, dialect: Dialect) -> None:
        # a request with new spans is pending again; what it had computed is dropped (energies are None while
        # pending); model and tenant stay the first non-empty ones; hosts stay as they were: a pending request's
        # hosts are read from its spans (merging JSON arrays in SQL both dialects run is not worth it)
        self._upsert_pending = dialect.format(
            """ ON CONFLICT (request_id) DO UPDATE SET
                status = 'pending',
                model = CASE WHEN requests.model = '' THEN excluded.model ELSE requests.model END,
                tenant = CASE WHEN requests.tenant = '' THEN excluded.tenant ELSE requests.tenant END,
                start_ns = {least}(requests.start_ns, excluded.start_ns),
                end_ns = {greatest}(requests.end_ns, excluded.end_ns),
                input_tokens = requests.input_tokens + excluded.input_tokens,
                output_tokens = requests.output_tokens + excluded.output_tokens,
                active_j = NULL, full_j = NULL, gpu_j = NULL, cpu_j = NULL, dram_j = NULL,
                span_count = requests.span_count + excluded.span_count,
                updated_ns = {greatest}(requests.updated_ns, excluded.updated_ns)"""
        )
        self._upsert_bindings = dialect.format(
            " ON CONFLICT (host_ref, pid, workload, phase, job) "
            "DO UPDATE SET seen_ns = {greatest}(process_bindings.seen_ns, excluded.seen_ns)"
        )
        # a result computed from fewer spans than are stored now is stale: a span came after the engine read them
        self._upsert_results = (
            " ON CONFLICT (request_id) DO UPDATE SET "
            + ", ".join(f"{column} = excluded.{column}" for column in _REQUEST_COLUMNS.split(", ")[1:])
            + " WHERE requests.span_count <= excluded.span_count"
        )
        # SQLite: RETURNING costs a third of the span insert (measured: 123 against 87 ms per 10,000 spans), so
        # there the count inserted tells that all were new, and when some were stored already, the rowids past the
        # table's last before the insert tell which (one writer at a time: no one else's rows among them)
        self._new_by_rowid = dialect.name == "sqlite"
        self._insert_spans = (
            f"INSERT INTO spans ({_SPAN_COLUMNS}) VALUES {{rows}} ON CONFLICT (request_id, span_id) DO NOTHING"
            + ("" if self._new_by_rowid else " RETURNING request_id, span_id")
        )

    # -- writes

    def write_spans(
        self, cursor: Cursor, spans: Sequence[SpanRow], hosts: HostRefs, now_ns: int
    ) -> tuple[int, dict[HostKey, int]]:
        """Insert the spans not stored yet and make their requests pending; returns how many were new and the host
        ids inserted (for ``HostRefs.remember`` once committed)."""
        if not spans:
            return 0, {}
        spans = [_without_nul(span) if _has_nul(span) else span for span in spans]
        refs, new_refs = hosts.resolve(cursor, {(span.hostname,) for span in spans})
        host_ref = {name: ref for (name,), ref in refs.items()}
        first: dict[SpanKey, SpanRow] = {}
        for span in spans:  # of one key given twice, the insert keeps the first
            first.setdefault((span.request_id, span.span_id), span)
        # sorted: PostgreSQL writers lock keys in one order, and index inserts in key order touch fewer pages
        ordered = sorted(first.items())
        new: set[SpanKey] = set()
        inserted = 0
        last_rowid = 0
        if self._new_by_rowid:
            cursor.execute("SELECT COALESCE(MAX(rowid), 0) FROM spans")
            last_rowid = int(cursor.fetchone()[0])
        for chunk in _chunks(ordered):
            params: list[Any] = []
            for _, span in chunk:
                params += _span_fields(span)
                params.append(host_ref[span.hostname])
                params.append(labels_text(span.labels) if span.labels else "{}")
            cursor.execute(self._insert_spans.format(rows=_marks(len(chunk), _SPAN_ROW)), params)
            if self._new_by_rowid:
                inserted += cursor.rowcount
            else:
                new.update(map(tuple, cursor.fetchall()))
        if self._new_by_rowid:
            if inserted == len(ordered):
                new_spans = [span for _, span in ordered]
            else:
                cursor.execute("SELECT request_id, span_id FROM spans WHERE rowid > ?", (last_rowid,))
                new = set(map(tuple, cursor.fetchall()))
                new_spans = [span for key, span in ordered if key in new]
        else:
            new_spans = [span for key, span in ordered if key in new]
        if new_spans:
            self._mark_pending(cursor, new_spans, now_ns)
        return len(new_spans), new_refs

    def _mark_pending(self, cursor: Cursor, spans: list[SpanRow], now_ns: int) -> None:
        """Upsert the requests of ``spans`` (new spans, sorted by request id) as pending."""
        one_host: dict[str, str] = {}
        rows: list[list[Any]] = []
        several: dict[int, set[str]] = {}  # row -> hosts, for requests with new spans on several hosts
        last = None
        for span in spans:
            if span.request_id != last:
                last = span.request_id
                text = one_host.get(span.hostname)
                if text is None:
                    text = one_host[span.hostname] = hosts_text([span.hostname])
                rows.append(
                    [span.request_id, span.model, span.tenant, text, span.start_ns, span.end_ns, span.input_tokens,
                     span.output_tokens, 1, now_ns]
                )  # fmt: skip
                continue
            row = rows[-1]
            row[1] = row[1] or span.model
            row[2] = row[2] or span.tenant
            if row[3] != one_host.get(span.hostname):
                several.setdefault(len(rows) - 1, set(json.loads(row[3]))).add(span.hostname)
            row[4] = min(row[4], span.start_ns)
            row[5] = max(row[5], span.end_ns)
            row[6] += span.input_tokens
            row[7] += span.output_tokens
            row[8] += 1
        for index, names in several.items():
            rows[index][3] = hosts_text(names)
        for chunk in _chunks(rows):
            cursor.execute(
                "INSERT INTO requests (request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, "
                f"output_tokens, span_count, updated_ns) VALUES {_marks(len(chunk), _PENDING_ROW)}"
                + self._upsert_pending,
                [value for row in chunk for value in row],
            )

    def write_bindings(
        self, cursor: Cursor, bindings: Sequence[ProcessBindingRow], hosts: HostRefs
    ) -> dict[HostKey, int]:
        """Upsert ``bindings``, the newest ``seen_ns`` of each kept; returns the host ids inserted."""
        if not bindings:
            return {}
        bindings = [_without_nul(b) if "\0" in b.hostname + b.workload + b.phase + b.job else b for b in bindings]
        refs, new_refs = hosts.resolve(cursor, [(binding.hostname,) for binding in bindings])
        newest: dict[tuple[int, int, str, str, str], int] = {}
        for b in bindings:  # an upsert statement may name a row once (PostgreSQL)
            key = (refs[(b.hostname,)], b.pid, b.workload, b.phase, b.job)
            newest[key] = max(newest.get(key, b.seen_ns), b.seen_ns)
        _insert(
            cursor,
            "INSERT INTO process_bindings (host_ref, pid, workload, phase, job, seen_ns)",
            "(?, ?, ?, ?, ?, ?)",
            [(*key, seen_ns) for key, seen_ns in sorted(newest.items())],
            self._upsert_bindings,
        )
        return new_refs

    def write_results(self, cursor: Cursor, results: Sequence[RequestResult]) -> int:
        """Upsert ``results`` (the last of one request id given twice); returns how many were written, the others
        being stale (computed from fewer spans than are stored now)."""
        latest: dict[str, RequestResult] = {}
        for result in results:
            if result.status not in STATUSES:
                raise ValueError(f"request {result.request_id!r}: status {result.status!r} is not one of {STATUSES}")
            latest[result.request_id] = result
        written = 0
        rows = [_result_row(latest[request_id]) for request_id in sorted(latest)]
        for chunk in _chunks(rows):
            cursor.execute(
                f"INSERT INTO requests ({_REQUEST_COLUMNS}) VALUES {_marks(len(chunk), _REQUEST_ROW)}"
                + self._upsert_results,
                [value for row in chunk for value in row],
            )
            written += max(cursor.rowcount, 0)  # a stale result's row is neither inserted nor updated
        return written

    # -- reads

    @staticmethod
    def process_bindings(cursor: Cursor, hostname: str, since_ns: int) -> list[ProcessBindingRow]:
        cursor.execute(
            "SELECT b.pid, b.workload, b.phase, b.job, b.seen_ns FROM span_hosts h "
            "JOIN process_bindings b ON b.host_ref = h.id WHERE h.hostname = ? AND b.seen_ns >= ? "
            "ORDER BY b.seen_ns, b.pid, b.workload, b.phase, b.job",
            (hostname, since_ns),
        )
        return [
            ProcessBindingRow(hostname, int(pid), workload, phase, job, int(seen_ns))
            for pid, workload, phase, job, seen_ns in cursor.fetchall()
        ]

    @staticmethod
    def pending_requests(cursor: Cursor, limit: int) -> list[str]:
        # the literal 'pending' (not a parameter) lets SQLite's planner use the partial index
        cursor.execute("SELECT request_id FROM requests WHERE status = 'pending' ORDER BY end_ns LIMIT ?", (limit,))
        return [str(row[0]) for row in cursor.fetchall()]

    @staticmethod
    def request_spans(cursor: Cursor, request_ids: Sequence[str]) -> list[SpanRow]:
        spans: list[SpanRow] = []
        for chunk in _chunks(sorted(set(request_ids))):
            cursor.execute(
                f"{_SELECT_SPANS} WHERE s.request_id IN ({_marks(len(chunk), '?')}) ORDER BY s.request_id, s.span_id",
                chunk,
            )
            spans += [_span(row) for row in cursor.fetchall()]
        return spans

    @staticmethod
    def spans_overlapping(cursor: Cursor, hostname: str, since_ns: int, until_ns: int) -> list[SpanRow]:
        cursor.execute(
            f"{_SELECT_SPANS} WHERE h.hostname = ? AND s.end_ns >= ? AND s.start_ns <= ? ORDER BY s.end_ns",
            (hostname, since_ns, until_ns),
        )
        return [_span(row) for row in cursor.fetchall()]

    @staticmethod
    def request(cursor: Cursor, request_id: str) -> RequestResult | None:
        cursor.execute(f"{_SELECT_REQUESTS} WHERE request_id = ?", (request_id,))
        row = cursor.fetchone()
        return None if row is None else _with_span_hosts(cursor, [_result(row)])[0]

    @staticmethod
    def requests(
        cursor: Cursor,
        model: str | None,
        since_ns: int | None,
        until_ns: int | None,
        limit: int,
        order: RequestOrder,
    ) -> list[RequestResult]:
        where: list[str] = []
        params: list[Any] = []
        for condition, value in (("model = ?", model), ("start_ns >= ?", since_ns), ("start_ns < ?", until_ns)):
            if value is not None:
                where.append(condition)
                params.append(value)
        sql = _SELECT_REQUESTS + (" WHERE " + " AND ".join(where) if where else "")
        if order == "energy":
            sql += " ORDER BY active_j DESC NULLS LAST, start_ns DESC, request_id LIMIT ?"
        else:
            sql += " ORDER BY start_ns DESC, request_id LIMIT ?"
        cursor.execute(sql, [*params, limit])
        return _with_span_hosts(cursor, [_result(row) for row in cursor.fetchall()])

    @staticmethod
    def request_summary(
        cursor: Cursor, by: Literal["model", "tenant", "host"], since_ns: int, until_ns: int
    ) -> list[RequestSummaryRow]:
        column = SUMMARY_COLUMN[by]
        cursor.execute(
            f"SELECT {column}, active_j, output_tokens FROM requests WHERE start_ns >= ? AND start_ns < ? "
            "AND status IN ('final', 'approximate') AND active_j IS NOT NULL",
            (since_ns, until_ns),
        )
        groups: dict[str, tuple[list[float], list[int]]] = {}
        for key, active_j, output_tokens in cursor.fetchall():
            for group in json.loads(key) if by == "host" else (key,):
                energies, tokens = groups.setdefault(group, ([], [0]))
                energies.append(float(active_j))
                tokens[0] += int(output_tokens)
        rows = []
        for group, (energies, tokens) in groups.items():
            total = float(sum(energies))
            p50, p95 = np.percentile(np.asarray(energies), [50.0, 95.0])  # linear between order statistics
            rows.append(
                RequestSummaryRow(
                    group=group,
                    count=len(energies),
                    energy_j=total,
                    p50_j=float(p50),
                    p95_j=float(p95),
                    output_tokens=tokens[0],
                    joules_per_output_token=total / tokens[0] if tokens[0] > 0 else None,
                )
            )
        rows.sort(key=lambda row: (-row.energy_j, row.group))
        return rows


_PENDING_ROW = "(?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _with_span_hosts(cursor: Cursor, results: list[RequestResult]) -> list[RequestResult]:
    """``results`` with the hosts of the pending ones read from their spans (see ``_upsert_pending``)."""
    pending = [result.request_id for result in results if result.status == "pending"]
    if not pending:
        return results
    hosts: dict[str, set[str]] = {}
    for chunk in _chunks(pending):
        cursor.execute(
            "SELECT DISTINCT s.request_id, h.hostname FROM spans s JOIN span_hosts h ON h.id = s.host_ref "
            f"WHERE s.request_id IN ({_marks(len(chunk), '?')})",
            chunk,
        )
        for request_id, hostname in cursor.fetchall():
            hosts.setdefault(request_id, set()).add(hostname)
    return [
        replace(result, hosts=tuple(sorted(hosts[result.request_id]))) if result.request_id in hosts else result
        for result in results
    ]


def _labels(text: str) -> dict[str, str]:
    return {} if text == "{}" else dict(json.loads(text))


def _span(row: Sequence[Any]) -> SpanRow:
    # the columns are SpanRow's fields in order (_SELECT_SPANS); positional: a third of the cost of keywords
    return SpanRow(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11], row[12],
        row[13], _labels(row[14]), row[15],
    )  # fmt: skip


def _result_row(r: RequestResult) -> tuple[Any, ...]:
    return (
        text(r.request_id), r.status, text(r.model), text(r.tenant), hosts_text(r.hosts), r.start_ns, r.end_ns,
        r.input_tokens, r.output_tokens, r.active_j, r.full_j, r.gpu_j, r.cpu_j, r.dram_j, r.spans, r.updated_ns,
    )  # fmt: skip


def _joules(value: Any) -> float | None:
    return None if value is None else float(value)


def _result(row: Sequence[Any]) -> RequestResult:
    return RequestResult(
        request_id=row[0],
        status=row[1],
        model=row[2],
        tenant=row[3],
        hosts=tuple(json.loads(row[4])),
        start_ns=int(row[5]),
        end_ns=int(row[6]),
        input_tokens=int(row[7]),
        output_tokens=int(row[8]),
        active_j=_joules(row[9]),
        full_j=_joules(row[10]),
        gpu_j=_joules(row[11]),
        cpu_j=_joules(row[12]),
        dram_j=_joules(row[13]),
        spans=int(row[14]),
        updated_ns=int(row[15]),
    )
