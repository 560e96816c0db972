"""Request spans, process bindings and per-request results, in SQL that SQLite and PostgreSQL both run.

``RequestSql`` holds the statements for one dialect; its methods run inside a transaction the caller holds (a
store call of its own, or the group write of batches whose spans and bindings commit with them).

Everything comes and goes as columns (``SpanColumns``, ``ResultColumns``): no object per span or per request. Spans
are stored as chunks (``span_chunks``: a write's spans of one host in one row); a request's row says where its spans
are (its hosts and times) and, while pending, what its spans say (model, tenant, hosts, times, tokens), so the API
can show it. A write first inserts the rows of its requests (``ON CONFLICT DO NOTHING``); the spans of requests that
were stored already are checked against their stored spans (a span sent twice is stored once) and make the request
pending again. The engine's result (status, hosts, energies) replaces a request's row unless a span arrived after
the engine read them (``span_count``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from operator import itemgetter, le
from typing import Any, Literal, get_args

import numpy as np

from collector.store import span_chunks
from collector.store.base import (
    ProcessBindingRow,
    RequestHourRow,
    RequestResult,
    RequestState,
    RequestStatus,
    RequestSummaryRow,
    ResultColumns,
    SpanColumns,
    SpanKey,
)
from collector.store.dialect import Dialect
from collector.store.writes import Cursor, Refs, _chunks, _insert, _marks

log = logging.getLogger(__name__)

HostKey = tuple[str]
RequestOrder = Literal["start", "energy"]
STATUSES = frozenset(get_args(RequestStatus))
HOUR_NS = 3600 * 10**9
SUMMARY_COLUMN = {"model": "model", "tenant": "tenant", "host": "hosts"}

_REQUEST_COLUMNS = (
    "request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, output_tokens, active_j, full_j, "
    "gpu_j, cpu_j, dram_j, span_count, updated_ns, co2_g, cost"
)
_REQUEST_ROW = "(" + ", ".join(["?"] * 18) + ")"
_SELECT_REQUESTS = f"SELECT {_REQUEST_COLUMNS} FROM requests"


@dataclass(frozen=True)
class _Statement:
    """A statement for one row (``one``, for ``executemany``) and for many (``many``: ``{rows}`` where ``row``, the
    one row's marks, goes once a row)."""

    one: str
    many: str
    row: str

    @classmethod
    def of(cls, many: str, row: str) -> _Statement:
        return cls(many.format(rows=row), many, row)


class HostRefs(Refs[HostKey]):
    def __init__(self) -> None:
        super().__init__("span_hosts", ("hostname",))


def text(value: str) -> str:
    """``value`` storable on both backends: PostgreSQL cannot hold NUL in text, so NUL becomes U+FFFD everywhere (a
    span that failed its transaction would fail its batch's, and the agent would send that batch forever)."""
    return value.replace("\0", "\ufffd") if "\0" in value else value


_TEXT_COLUMNS = ("request_id", "span_id", "hostname", "workload", "service_name", "model", "tenant")


def _without_nul_columns(spans: SpanColumns) -> SpanColumns:
    """``spans`` with every text column through ``text`` (labels are JSON, which escapes NUL itself); one scan per
    column when there is no NUL, as is usual."""
    changed: dict[str, Any] = {
        name: [text(value) for value in getattr(spans, name)]
        for name in _TEXT_COLUMNS
        if "\0" in "".join(getattr(spans, name))
    }
    return replace(spans, **changed) if changed else spans


def _without_nul(row: ProcessBindingRow) -> ProcessBindingRow:
    """``row`` with every text field through ``text`` (labels are JSON, which escapes NUL itself)."""
    changes: dict[str, Any] = {f.name: text(getattr(row, f.name)) for f in fields(row) if f.type == "str"}
    return replace(row, **changes)


def hosts_text(hosts: Iterable[str]) -> str:
    return json.dumps(sorted({text(host) for host in hosts}), ensure_ascii=False, separators=(",", ":"))


class RequestSql:
    def __init__(self, dialect: Dialect, writer_id: int) -> None:
        self._writer_id = writer_id
        # a stored request with new spans is pending again; what it had computed is dropped (energies are None while
        # pending); model and tenant stay the first non-empty ones; hosts: those of all its spans, merged by the
        # writer, which read the row (``write_spans``); span_*: where its spans are, only ever widened
        self._upsert_pending = dialect.format(
            """ ON CONFLICT (request_id) DO UPDATE SET
                status = 'pending',
                model = CASE WHEN requests.model = '' THEN excluded.model ELSE requests.model END,
                tenant = CASE WHEN requests.tenant = '' THEN excluded.tenant ELSE requests.tenant END,
                hosts = excluded.hosts,
                span_hosts = excluded.span_hosts,
                span_start_ns = COALESCE(
                    {least}(requests.span_start_ns, excluded.span_start_ns), excluded.span_start_ns),
                span_end_ns = COALESCE({greatest}(requests.span_end_ns, excluded.span_end_ns), excluded.span_end_ns),
                start_ns = {least}(requests.start_ns, excluded.start_ns),
                end_ns = {greatest}(requests.end_ns, excluded.end_ns),
                input_tokens = requests.input_tokens + excluded.input_tokens,
                output_tokens = requests.output_tokens + excluded.output_tokens,
                active_j = NULL, full_j = NULL, gpu_j = NULL, cpu_j = NULL, dram_j = NULL, co2_g = NULL, cost = NULL,
                span_count = requests.span_count + excluded.span_count,
                updated_ns = {greatest}(requests.updated_ns, excluded.updated_ns)"""
        )
        self._upsert_bindings = " ON CONFLICT (host_ref, pid, seen_ns, workload, phase, job) DO NOTHING"
        # a result computed from fewer spans than are stored now is stale: a span came after the engine read them
        self._upsert_results = (
            " ON CONFLICT (request_id) DO UPDATE SET "
            + ", ".join(f"{column} = excluded.{column}" for column in _REQUEST_COLUMNS.split(", ")[1:])
            + " WHERE requests.span_count <= excluded.span_count"
        )
        # SQLite: the count inserted tells that all requests were new, and when some were stored already, the rowids
        # past the table's last before the insert tell which (one writer at a time: no one else's rows among them);
        # PostgreSQL: RETURNING
        self._new_by_rowid = dialect.name == "sqlite"
        new_requests = (
            "INSERT INTO requests (request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, "
            "output_tokens, span_count, updated_ns, span_hosts, span_start_ns, span_end_ns) VALUES {rows} "
            "ON CONFLICT (request_id) DO NOTHING"
        )
        self._insert_new_requests = _Statement.of(
            new_requests + ("" if self._new_by_rowid else " RETURNING request_id"), _PENDING_ROW
        )
        # where the spans of stored requests are; locked (PostgreSQL) while new spans' hosts are merged in, in the
        # order of the ids' code points, as the writers' statements take them (no deadlock)
        self._select_stored_unlocked = (
            "SELECT request_id, span_hosts, span_start_ns, span_end_ns FROM requests "
            "WHERE request_id IN ({marks}) AND span_hosts IS NOT NULL"
        )
        self._lock_rows = ' ORDER BY request_id COLLATE "C" FOR UPDATE' if dialect.row_locks else ""
        self._select_stored = self._select_stored_unlocked + self._lock_rows
        self._insert_pending = _Statement.of(
            "INSERT INTO requests (request_id, status, model, tenant, hosts, start_ns, end_ns, input_tokens, "
            "output_tokens, span_count, updated_ns, span_hosts, span_start_ns, span_end_ns) VALUES {rows}"
            + self._upsert_pending,
            _PENDING_ROW,
        )
        self._insert_results = _Statement.of(
            f"INSERT INTO requests ({_REQUEST_COLUMNS}) VALUES {{rows}}" + self._upsert_results, _REQUEST_ROW
        )
        # the engine's results: a stored request gets its status, hosts and energies (see write_results)
        update = (
            "status = ?, hosts = ?, active_j = ?, full_j = ?, gpu_j = ?, cpu_j = ?, dram_j = ?, co2_g = ?, cost = ?, "
            "updated_ns = ?"
        )
        names = [part.split(" = ")[0] for part in update.split(", ")]
        # many: a VALUES list's columns are column1, column2... (SQLite); no WITH before UPDATE, which would hide
        # the rows changed (Python's sqlite3 counts them only for a statement that starts INSERT, UPDATE...)
        self._update_results = _Statement(
            f"UPDATE requests SET {update} WHERE request_id = ? AND span_count <= ?",
            "UPDATE requests SET "
            + ", ".join(f"{name} = v.column{i}" for i, name in enumerate(names, 1))
            + " FROM (VALUES {rows}) AS v WHERE requests.request_id = v.column"
            + f"{len(names) + 1} AND requests.span_count <= v.column{len(names) + 2}",
            "(" + ", ".join(["?"] * (len(names) + 2)) + ")",
        )

    # -- writes

    def _many(self, cursor: Cursor, statement: _Statement, rows: Sequence[Sequence[Any]]) -> int:
        """Run ``statement`` for every one of ``rows``; returns the rows changed. PostgreSQL: ``executemany`` (psycopg
        pipelines it). SQLite: multi-row statements of ``ROWS_PER_STATEMENT`` rows: each statement step releases and
        takes back the GIL (SQLite runs without it), and ``executemany`` steps once a row, each time waiting for the
        GIL behind the engine's and the event loop's Python (see ``writes``)."""
        if not self._new_by_rowid:
            cursor.executemany(statement.one, rows)
            return max(cursor.rowcount, 0)
        changed = 0
        for chunk in _chunks(rows):
            cursor.execute(statement.many.format(rows=_marks(len(chunk), statement.row)), [v for r in chunk for v in r])
            changed += max(cursor.rowcount, 0)
        return changed

    def write_spans(
        self, cursor: Cursor, spans: SpanColumns, hosts: HostRefs, now_ns: int
    ) -> tuple[SpanColumns, dict[HostKey, int]]:
        """Store the spans not stored yet and make their requests pending; returns the new spans (``spans`` itself
        when all were new, as happens but for a replay) and the host ids inserted (for ``HostRefs.remember`` once
        committed)."""
        if not len(spans):
            return spans, {}
        spans = _without_nul_columns(spans)
        refs, new_refs = hosts.resolve(cursor, {(name,) for name in spans.hostname})
        host_ref = {name: ref for (name,), ref in refs.items()}
        spans = _first_of_each_key(spans)  # of one key given twice, the first is kept
        keys = list(zip(spans.request_id, spans.span_id, strict=True))
        # in key order: PostgreSQL writers lock keys in one order; and each index page is visited once, not once
        # a row (measured, SQLite, 400,000 random request ids: 5.6 against 10.2 us an index insert)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        if order != list(range(len(order))):
            spans = spans.take(order)
        rows = _pending_rows(spans, now_ns)
        new = self._insert_requests(cursor, rows)
        if new is not None:  # some requests were stored already: their spans may be too
            spans = self._add_to_stored(cursor, spans, [row for row in rows if row[0] not in new], now_ns)
        if len(spans):
            self._write_chunks(cursor, spans, host_ref, now_ns)
        return spans, new_refs

    def _insert_requests(self, cursor: Cursor, rows: list[list[Any]]) -> set[str] | None:
        """Insert the pending rows of requests not stored yet; returns the ids inserted, or None when all were."""
        if self._new_by_rowid:
            cursor.execute("SELECT COALESCE(MAX(rowid), 0) FROM requests")
            last_rowid = int(cursor.fetchone()[0])
            if self._many(cursor, self._insert_new_requests, rows) == len(rows):
                return None
            cursor.execute("SELECT request_id FROM requests WHERE rowid > ?", (last_rowid,))
            return {str(rid) for (rid,) in cursor.fetchall()}
        new: set[str] = set()
        statement = self._insert_new_requests
        for chunk in _chunks(rows):
            cursor.execute(statement.many.format(rows=_marks(len(chunk), statement.row)), [v for r in chunk for v in r])
            new.update(str(rid) for (rid,) in cursor.fetchall())
        return None if len(new) == len(rows) else new

    def _add_to_stored(self, cursor: Cursor, spans: SpanColumns, rows: list[list[Any]], now_ns: int) -> SpanColumns:
        """``spans`` without those stored already; the requests of ``rows`` (stored already) get the others' times,
        tokens, count and hosts, and are pending again (a row deleted meanwhile, by another aggregator's prune, is
        written anew)."""
        ids = [row[0] for row in rows]
        stored = self._stored(cursor, ids, lock=True)
        known = self._spans_of(cursor, stored)
        had = set(zip(known.request_id, known.span_id, strict=True))
        if had:
            spans = spans.take(
                i for i, key in enumerate(zip(spans.request_id, spans.span_id, strict=True)) if key not in had
            )
        named = set(ids)
        more = spans.take(i for i, rid in enumerate(spans.request_id) if rid in named)
        if len(more):
            update = _pending_rows(more, now_ns)
            for row in update:
                where = stored.get(row[0])
                if where is not None:
                    row[3] = row[10] = hosts_text({*json.loads(where[0]), *json.loads(row[3])})
            self._many(cursor, self._insert_pending, update)
        return spans

    def _write_chunks(self, cursor: Cursor, spans: SpanColumns, host_ref: dict[str, int], now_ns: int) -> None:
        """``spans`` as one chunk per host."""
        by_host: dict[str, list[int]] = {}
        if len(set(spans.hostname)) > 1:
            for i, host in enumerate(spans.hostname):
                by_host.setdefault(host, []).append(i)
        rows = []
        for host in sorted(by_host) or [spans.hostname[0]]:
            part = spans.take(by_host[host]) if by_host else spans
            rows.append((*_chunk_row(host_ref[host], part, now_ns), self._writer_id))
        _insert(cursor, _INSERT_OWN_CHUNK, _OWN_CHUNK_ROW, rows)

    def _stored(self, cursor: Cursor, request_ids: Sequence[str], *, lock: bool) -> dict[str, tuple[str, int, int]]:
        """Where the spans of the stored ones of ``request_ids`` (sorted) are: hosts (JSON), earliest and latest
        time; ``lock``: their rows locked to the end of the transaction (PostgreSQL)."""
        statement = self._select_stored if lock else self._select_stored_unlocked
        stored: dict[str, tuple[str, int, int]] = {}
        for chunk in _chunks(request_ids):
            cursor.execute(statement.format(marks=_marks(len(chunk), "?")), list(chunk))
            stored.update((str(rid), (hosts, int(start), int(end))) for rid, hosts, start, end in cursor.fetchall())
        return stored

    def _spans_of(self, cursor: Cursor, requests: dict[str, tuple[str, int, int]]) -> SpanColumns:
        """The stored spans of ``requests`` (id -> their row's hosts, start and end): from the chunks of their hosts
        overlapping their times."""
        ranges: dict[str, list[tuple[int, int]]] = {}
        for hosts_json, start, end in requests.values():
            for host in json.loads(hosts_json):
                ranges.setdefault(host, []).append((start, end))
        parts = []
        for host in sorted(ranges):
            for since, until in span_chunks.windows(ranges[host]):
                found = self._chunk_spans(cursor, host, since, until)
                parts.append(found.take(i for i, rid in enumerate(found.request_id) if rid in requests))
        # a span met in two windows (it overlaps both) once
        return _first_of_each_key(SpanColumns.concat(parts) if parts else SpanColumns.empty())

    @staticmethod
    def _chunk_spans(cursor: Cursor, hostname: str, since_ns: int, until_ns: int) -> SpanColumns:
        """The spans of ``hostname`` with end_ns >= since_ns and start_ns <= until_ns, in the order stored."""
        cursor.execute(
            "SELECT c.id, c.data FROM span_hosts h JOIN span_chunks c ON c.host_ref = h.id "
            "WHERE h.hostname = ? AND c.max_end_ns >= ? AND c.min_start_ns <= ? ORDER BY c.id",
            (hostname, since_ns, until_ns),
        )
        parts = []
        for ref, data in cursor.fetchall():
            spans = _decoded(ref, hostname, data)
            if spans is None:
                continue
            inside = span_chunks.overlapping(spans, since_ns, until_ns)
            parts.append(spans if len(inside) == len(spans) else spans.take(inside))
        return SpanColumns.concat(parts) if parts else SpanColumns.empty()

    def write_bindings(
        self, cursor: Cursor, bindings: Sequence[ProcessBindingRow], hosts: HostRefs
    ) -> dict[HostKey, int]:
        """Store ``bindings``, each sighting once; returns the host ids inserted."""
        if not bindings:
            return {}
        bindings = [_without_nul(b) if "\0" in b.hostname + b.workload + b.phase + b.job else b for b in bindings]
        refs, new_refs = hosts.resolve(cursor, [(binding.hostname,) for binding in bindings])
        # an insert statement may name a row once (PostgreSQL's ON CONFLICT)
        rows = {(refs[(b.hostname,)], b.pid, b.workload, b.phase, b.job, b.seen_ns) for b in bindings}
        _insert(
            cursor,
            "INSERT INTO process_bindings (host_ref, pid, workload, phase, job, seen_ns)",
            "(?, ?, ?, ?, ?, ?)",
            sorted(rows),
            self._upsert_bindings,
        )
        return new_refs

    def write_results(self, cursor: Cursor, results: ResultColumns, *, whole: bool) -> list[str]:
        """Write ``results`` (one per request id); returns the ids not written, being stale (computed from fewer
        spans than are stored now). ``whole``: upsert every column; else (the engine's results, computed from the
        stored spans) a stored request gets its status, hosts, energies and ``updated_ns`` only (its model, tenant,
        times and tokens are what its spans say already): an update that touches no index but the pending one."""
        if not len(results):
            return []
        bad = set(results.status) - STATUSES
        if bad:
            i = next(i for i, status in enumerate(results.status) if status in bad)
            raise ValueError(
                f"request {results.request_id[i]!r}: status {results.status[i]!r} is not one of {STATUSES}"
            )
        if any("\0" in "".join(column) for column in (results.request_id, results.model, results.tenant)):
            results = replace(
                results,
                request_id=[text(v) for v in results.request_id],
                model=[text(v) for v in results.model],
                tenant=[text(v) for v in results.tenant],
            )
        r = results
        if whole:
            rows = r.rows()
            rows.sort(key=itemgetter(0))  # in key order (see write_spans); PostgreSQL: row locks in one order
            changed = self._many(cursor, self._insert_results, rows)
        else:
            update = list(
                zip(r.status, r.hosts, r.active_j, r.full_j, r.gpu_j, r.cpu_j, r.dram_j, r.co2_g, r.cost,
                    r.updated_ns, r.request_id, r.span_count, strict=True)
            )  # fmt: skip
            update.sort(key=itemgetter(10))  # by request_id: see write_spans; PostgreSQL: row locks in one order
            changed = self._many(cursor, self._update_results, update)
        if changed == len(r):  # a stale result's row is neither inserted nor updated
            return []
        rows = r.rows()
        counts: dict[str, int] = {}
        ids = [row[0] for row in rows]
        for chunk in _chunks(ids):
            cursor.execute(
                f"SELECT request_id, span_count FROM requests WHERE request_id IN ({_marks(len(chunk), '?')})", chunk
            )
            counts.update((str(rid), int(count)) for rid, count in cursor.fetchall())
        missing = [row for row in rows if row[0] not in counts]
        if missing:  # not stored (pruned meanwhile): the whole row
            self._many(cursor, self._insert_results, missing)
        return [row[0] for row in rows if counts.get(row[0], -1) > row[14]]

    def prune_spans(self, cursor: Cursor, cutoff_ns: int) -> int:
        """Drop the spans that ended before ``cutoff_ns``: the chunks all of whose spans did, and those spans from
        the chunks that hold newer ones too; returns how many spans went."""
        where = "FROM span_chunks WHERE host_ref IN (SELECT id FROM span_hosts) AND max_end_ns < ?"
        cursor.execute(f"SELECT COALESCE(SUM(span_count), 0) {where}", (cutoff_ns,))
        dropped = int(cursor.fetchone()[0])
        if dropped:
            cursor.execute(f"DELETE {where}", (cutoff_ns,))
        return dropped + _thin_chunks(
            cursor,
            "c.max_end_ns >= ? AND c.min_end_ns < ?",
            (cutoff_ns, cutoff_ns),
            lambda spans: [i for i, end in enumerate(spans.end_ns) if end >= cutoff_ns],
        )

    def prune_orphan_spans(self, cursor: Cursor, cutoff_ns: int) -> int:
        """Drop the spans of requests no longer stored from the chunks holding a span that started before
        ``cutoff_ns`` (a pruned request's spans all did); returns how many spans went. Reads every such chunk: run
        only when requests are kept less long than raw samples."""

        def stored(spans: SpanColumns) -> list[int]:
            kept: set[str] = set()
            for chunk in _chunks(sorted(set(spans.request_id))):
                cursor.execute(
                    f"SELECT request_id FROM requests WHERE request_id IN ({_marks(len(chunk), '?')})", chunk
                )
                kept.update(str(rid) for (rid,) in cursor.fetchall())
            return [i for i, rid in enumerate(spans.request_id) if rid in kept]

        return _thin_chunks(cursor, "c.min_start_ns < ?", (cutoff_ns,), stored)

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

    def reopen(self, cursor: Cursor, hostname: str, since_ns: int, until_ns: int) -> dict[str, str]:
        """``Store.reopen_requests``: approximate and no_samples requests with a span on the host overlapping
        [since_ns, until_ns] become pending, their energies dropped; returns them, each with the status it had."""
        ids = sorted(set(self._chunk_spans(cursor, hostname, since_ns, until_ns).request_id))
        reopened: dict[str, str] = {}
        for chunk in _chunks(ids):
            marks = _marks(len(chunk), "?")
            cursor.execute(
                "SELECT request_id, status FROM requests WHERE status IN ('approximate', 'no_samples') "
                f"AND request_id IN ({marks}){self._lock_rows}",
                list(chunk),
            )
            found = {str(rid): str(status) for rid, status in cursor.fetchall()}
            if not found:
                continue
            cursor.execute(
                "UPDATE requests SET status = 'pending', active_j = NULL, full_j = NULL, gpu_j = NULL, cpu_j = NULL, "
                "dram_j = NULL, co2_g = NULL, cost = NULL WHERE status IN ('approximate', 'no_samples') "
                f"AND request_id IN ({_marks(len(found), '?')})",
                sorted(found),
            )
            reopened.update(found)
        return reopened

    @staticmethod
    def pending_requests(cursor: Cursor, limit: int) -> list[tuple[str, int]]:
        """(request id, spans stored) of up to ``limit`` pending requests, oldest end first."""
        # the literal 'pending' (not a parameter) lets SQLite's planner use the partial index
        cursor.execute(
            "SELECT request_id, span_count FROM requests WHERE status = 'pending' ORDER BY end_ns LIMIT ?", (limit,)
        )
        return [(str(rid), int(count)) for rid, count in cursor.fetchall()]

    @staticmethod
    def request_states(cursor: Cursor, request_ids: Sequence[str]) -> dict[str, RequestState]:
        """Status, active_j, full_j and span count of the stored ones of ``request_ids``."""
        states: dict[str, RequestState] = {}
        for chunk in _chunks(sorted(set(request_ids))):
            cursor.execute(
                "SELECT request_id, status, active_j, full_j, span_count FROM requests "
                f"WHERE request_id IN ({_marks(len(chunk), '?')})",
                chunk,
            )
            for rid, status, active, full, count in cursor.fetchall():
                states[str(rid)] = (str(status), _joules(active), _joules(full), int(count))
        return states

    def request_spans(self, cursor: Cursor, request_ids: Sequence[str]) -> SpanColumns:
        """The stored spans of those requests, by request id and span id."""
        spans = self._spans_of(cursor, self._stored(cursor, sorted(set(request_ids)), lock=False))
        order = sorted(range(len(spans)), key=lambda i: (spans.request_id[i], spans.span_id[i]))
        return spans.take(order)

    def spans_overlapping(self, cursor: Cursor, hostname: str, since_ns: int, until_ns: int) -> SpanColumns:
        spans = self._chunk_spans(cursor, hostname, since_ns, until_ns)
        return spans.take(sorted(range(len(spans)), key=spans.end_ns.__getitem__))

    def written_elsewhere(self, cursor: Cursor, hostname: str, since_ns: int, until_ns: int) -> bool:
        """Whether a chunk of ``hostname`` overlapping [since_ns, until_ns] (by its bounds) was written by another
        store than this one (or before chunks had a writer); read in the index alone."""
        cursor.execute(
            "SELECT 1 FROM span_hosts h JOIN span_chunks c ON c.host_ref = h.id WHERE h.hostname = ? "
            "AND c.max_end_ns >= ? AND c.min_start_ns <= ? AND (c.writer IS NULL OR c.writer <> ?) LIMIT 1",
            (hostname, since_ns, until_ns, self._writer_id),
        )
        return cursor.fetchone() is not None

    @staticmethod
    def latest_span_ends(cursor: Cursor) -> dict[str, int]:
        # one index probe per host (span_chunks_by_host), not a scan of the chunks
        cursor.execute(
            "SELECT h.hostname, (SELECT MAX(c.max_end_ns) FROM span_chunks c WHERE c.host_ref = h.id) FROM span_hosts h"
        )
        return {str(host): int(end) for host, end in cursor.fetchall() if end is not None}

    @staticmethod
    def request(cursor: Cursor, request_id: str) -> RequestResult | None:
        cursor.execute(f"{_SELECT_REQUESTS} WHERE request_id = ?", (request_id,))
        row = cursor.fetchone()
        return None if row is None else _result(row)

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
        return [_result(row) for row in cursor.fetchall()]

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

    @staticmethod
    def request_hours(cursor: Cursor, since_ns: int, until_ns: int) -> list[RequestHourRow]:
        # the hour as a literal (PostgreSQL would not match a parameter in SELECT to another in GROUP BY), and by
        # integer division (both databases truncate integers; the store's SQL has no % for psycopg's placeholders)
        cursor.execute(
            f"SELECT model, start_ns / {HOUR_NS} * {HOUR_NS}, COUNT(*), SUM(active_j) FROM requests "
            "WHERE start_ns >= ? AND start_ns < ? AND status IN ('final', 'approximate') AND active_j IS NOT NULL "
            "GROUP BY 1, 2 ORDER BY 1, 2",
            (since_ns, until_ns),
        )
        return [
            RequestHourRow(str(model), int(hour), int(count), float(energy))
            for model, hour, count, energy in cursor.fetchall()
        ]


_CHUNK_COLUMNS = "host_ref, min_start_ns, min_end_ns, max_end_ns, span_count, received_ns, data"
_INSERT_CHUNK = f"INSERT INTO span_chunks ({_CHUNK_COLUMNS})"  # schema step 5's, before chunks had a writer
_CHUNK_ROW = "(?, ?, ?, ?, ?, ?, ?)"
_INSERT_OWN_CHUNK = f"INSERT INTO span_chunks ({_CHUNK_COLUMNS}, writer)"
_OWN_CHUNK_ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"


def _chunk_row(host_ref: int, spans: SpanColumns, received_ns: int) -> tuple[Any, ...]:
    """``_CHUNK_ROW``'s values for ``spans`` (at least one) of one host."""
    return (host_ref, *_bounds(spans), len(spans), received_ns, span_chunks.encode(spans))


def _bounds(spans: SpanColumns) -> tuple[int, int, int]:
    """A chunk's min_start_ns, min_end_ns and max_end_ns: every span's start and end lie in [min_start_ns,
    max_end_ns], even one that ends before it starts (the store keeps what it is given)."""
    return (
        min(min(spans.start_ns), min(spans.end_ns)),
        min(spans.end_ns),
        max(max(spans.end_ns), max(spans.start_ns)),
    )


def _first_of_each_key(spans: SpanColumns) -> SpanColumns:
    """``spans`` with the first of the spans of each (request_id, span_id); ``spans`` itself when none repeats."""
    keys = list(zip(spans.request_id, spans.span_id, strict=True))
    if len(set(keys)) == len(keys):
        return spans
    first: dict[SpanKey, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    return spans.take(sorted(first.values()))


def _decoded(ref: int, hostname: str, data: bytes) -> SpanColumns | None:
    """The spans of chunk ``ref``; None (logged) when its data is damaged: one bad row costs its own spans, never
    every read, pass and prune that meets it."""
    try:
        return span_chunks.decode(data, hostname)
    except span_chunks.ChunkError as exc:
        log.error("span chunk %s of host %s is damaged (%s): its spans are skipped", ref, hostname, exc)
        return None


def _thin_chunks(cursor: Cursor, where: str, params: Sequence[Any], keep: Callable[[SpanColumns], list[int]]) -> int:
    """Keep only the spans ``keep`` picks (positions) of each chunk matching ``where`` (on ``c``); returns how many
    spans went. A damaged chunk is left as it is (gone once all of it is older than the raw cutoff)."""
    cursor.execute(
        f"SELECT c.id, h.hostname, c.data FROM span_hosts h JOIN span_chunks c ON c.host_ref = h.id "
        f"WHERE {where} ORDER BY c.id",
        params,
    )
    dropped = 0
    for ref, host, data in cursor.fetchall():
        spans = _decoded(ref, str(host), data)
        if spans is not None:
            dropped += _keep_in_chunk(cursor, int(ref), spans, keep(spans))
    return dropped


def _keep_in_chunk(cursor: Cursor, ref: int, spans: SpanColumns, keep: list[int]) -> int:
    """Keep only the spans at ``keep`` of chunk ``ref`` (``spans``): rewrite it, or delete it when none stay;
    returns how many went."""
    if len(keep) == len(spans):
        return 0
    if not keep:
        cursor.execute("DELETE FROM span_chunks WHERE id = ?", (ref,))
        return len(spans)
    part = spans.take(keep)
    cursor.execute(
        "UPDATE span_chunks SET min_start_ns = ?, min_end_ns = ?, max_end_ns = ?, span_count = ?, data = ? "
        "WHERE id = ?",
        (*_bounds(part), len(part), span_chunks.encode(part), ref),
    )
    return len(spans) - len(keep)


_PENDING_ROW = "(?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _pending_rows(spans: SpanColumns, now_ns: int) -> list[list[Any]]:
    """A pending row per request of ``spans`` (``_PENDING_ROW``'s values: what its spans say, and where they are:
    hosts, the earliest and the latest of their starts and ends), by request id."""
    host_text = {name: hosts_text([name]) for name in set(spans.hostname)}
    n = len(spans)
    if len(set(spans.request_id)) == n:  # a span per request, the usual case: rows straight from the columns
        hosts = [host_text[h] for h in spans.hostname] if len(host_text) > 1 else [host_text[spans.hostname[0]]] * n
        first, last = spans.start_ns, spans.end_ns
        if not all(map(le, first, last)):  # a span that ends before it starts (the store keeps what it is given)
            first, last = list(map(min, first, last)), list(map(max, first, last))
        rows = list(
            map(
                list,
                zip(
                    spans.request_id, spans.model, spans.tenant, hosts, spans.start_ns, spans.end_ns,
                    spans.input_tokens, spans.output_tokens, [1] * n, [now_ns] * n, hosts, first, last,
                    strict=True,
                ),
            )
        )  # fmt: skip
    else:
        by_request: dict[str, list[Any]] = {}
        several: dict[str, set[str]] = {}
        for rid, host, model, tenant, start, end, tokens_in, tokens_out in zip(
            spans.request_id, spans.hostname, spans.model, spans.tenant, spans.start_ns, spans.end_ns,
            spans.input_tokens, spans.output_tokens, strict=True,
        ):  # fmt: skip
            row = by_request.get(rid)
            if row is None:
                by_request[rid] = [
                    rid, model, tenant, host_text[host], start, end, tokens_in, tokens_out, 1, now_ns,
                    host_text[host], min(start, end), max(start, end),
                ]  # fmt: skip
                continue
            row[1] = row[1] or model
            row[2] = row[2] or tenant
            if row[3] != host_text[host]:
                several.setdefault(rid, set(json.loads(row[3]))).add(host)
            row[4] = min(row[4], start)
            row[5] = max(row[5], end)
            row[6] += tokens_in
            row[7] += tokens_out
            row[8] += 1
            row[11] = min(row[11], start, end)
            row[12] = max(row[12], start, end)
        for rid, names in several.items():
            by_request[rid][3] = by_request[rid][10] = hosts_text(names)
        rows = list(by_request.values())
    rows.sort(key=itemgetter(0))  # in key order (see write_spans); PostgreSQL: row locks in one order
    return rows


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
        co2_g=_joules(row[16]),
        cost=_joules(row[17]),
    )


MIGRATION_PAGE = 10_000  # spans read at a time while moving the spans table into chunks


def spans_to_chunks(cursor: Cursor, dialect: Dialect) -> None:
    """Schema step 5: the ``spans`` table's rows as chunks, host by host in end order, ``MIGRATION_PAGE`` spans a
    chunk; each request with spans gets where they are (``span_hosts``, ``span_start_ns``, ``span_end_ns``), and a
    pending one their hosts (its row had the first span's); then ``spans`` goes."""
    if dialect.name == "sqlite":
        cursor.execute(
            """UPDATE requests SET
                span_start_ns = (SELECT MIN(min(s.start_ns, s.end_ns)) FROM spans s
                                 WHERE s.request_id = requests.request_id),
                span_end_ns = (SELECT MAX(max(s.start_ns, s.end_ns)) FROM spans s
                               WHERE s.request_id = requests.request_id),
                span_hosts = (SELECT json_group_array(hostname) FROM (
                    SELECT DISTINCT h.hostname FROM spans s JOIN span_hosts h ON h.id = s.host_ref
                    WHERE s.request_id = requests.request_id ORDER BY h.hostname))
            WHERE request_id IN (SELECT request_id FROM spans)"""
        )
    else:
        cursor.execute(
            """UPDATE requests r SET span_start_ns = x.lo, span_end_ns = x.hi, span_hosts = x.hosts FROM (
                SELECT s.request_id, MIN(LEAST(s.start_ns, s.end_ns)) AS lo, MAX(GREATEST(s.start_ns, s.end_ns)) AS hi,
                       json_agg(DISTINCT h.hostname ORDER BY h.hostname)::text AS hosts
                FROM spans s JOIN span_hosts h ON h.id = s.host_ref GROUP BY s.request_id) x
            WHERE r.request_id = x.request_id"""
        )
    cursor.execute("UPDATE requests SET hosts = span_hosts WHERE status = 'pending' AND span_hosts IS NOT NULL")
    cursor.execute("SELECT id, hostname FROM span_hosts ORDER BY id")
    columns = (
        "request_id, span_id, start_ns, end_ns, workload, pid, service_name, model, tenant, input_tokens, "
        "output_tokens, queue_end_ns, prefill_end_ns, labels, received_ns"
    )
    for ref, hostname in cursor.fetchall():
        after: int | None = None
        while True:
            if after is None:
                cursor.execute(
                    f"SELECT {columns} FROM spans WHERE host_ref = ? ORDER BY end_ns LIMIT ?", (ref, MIGRATION_PAGE)
                )
            else:
                cursor.execute(
                    f"SELECT {columns} FROM spans WHERE host_ref = ? AND end_ns > ? ORDER BY end_ns LIMIT ?",
                    (ref, after, MIGRATION_PAGE),
                )
            rows = cursor.fetchall()
            full = len(rows) == MIGRATION_PAGE
            if full:  # the spans ending at the page's last end, all of them (the next page starts past it)
                last = int(rows[-1][3])
                rows = [row for row in rows if int(row[3]) < last]
                cursor.execute(f"SELECT {columns} FROM spans WHERE host_ref = ? AND end_ns = ?", (ref, last))
                rows += cursor.fetchall()
                after = last
            if rows:
                spans = SpanColumns.of_rows([(r[0], r[1], hostname, *r[2:]) for r in rows])
                _insert(cursor, _INSERT_CHUNK, _CHUNK_ROW, [_chunk_row(ref, spans, max(spans.received_ns))])
            if not full:
                break
    cursor.execute("DROP TABLE spans")
