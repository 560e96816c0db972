"""The store's logic, in SQL that SQLite and PostgreSQL both run: the schema, writes (``writes.GroupWrite``: dedup,
the contiguous watermark, packed raw chunks, rollup upserts; one transaction per group of batches) and the reads.
Backends supply connections and transactions (``_run``).
"""

from __future__ import annotations

import abc
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import numpy as np

from collector.store.base import (
    DeviceRow,
    DeviceSeries,
    HostRow,
    LastSample,
    ProcessBindingRow,
    RequestHourRow,
    RequestResult,
    RequestState,
    RequestSummaryRow,
    ResultColumns,
    SpanColumns,
    SpanRow,
    Store,
    StoredBatch,
    StoreError,
    WorkloadEnergyRow,
    WriteResult,
    continuous_energy,
    missing_runs,
    unmeasured_stretches,
)
from collector.store.dialect import Dialect
from collector.store.migrations import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_TABLE
from collector.store.rows import WorkloadKey, pack, unpack_times, unpack_values
from collector.store.spans import SUMMARY_COLUMN, HostKey, HostRefs, RequestOrder, RequestSql, hosts_text, text
from collector.store.steps import StepsReads, prune_steps
from collector.store.writes import Cursor, GroupWrite, WorkloadRefs

__all__ = ["Cursor", "SqlStore", "T"]

log = logging.getLogger(__name__)

T = TypeVar("T")
MINUTE_NS = 60_000_000_000


class SqlStore(StepsReads, Store):
    """``Store`` over a SQL database; subclasses open connections and run transactions."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._workloads = WorkloadRefs()
        self._group_write = GroupWrite(dialect)
        self._hosts = HostRefs()
        self.writer_id = secrets.randbits(63)  # this open store's, on the span chunks it writes
        self._requests = RequestSql(dialect, self.writer_id)
        self._span_listeners: list[tuple[Callable[[SpanColumns], None], Callable[[dict[str, int]], None] | None]] = []

    # -- what backends provide

    @abc.abstractmethod
    def _run(self, work: Callable[[Cursor], T], *, write: bool) -> T:
        """Run ``work`` in one transaction and commit it (durably, for writes); roll back if it raises."""

    @abc.abstractmethod
    def _lock_schema(self, cursor: Cursor) -> None:
        """Hold off other processes' migrations until this transaction ends."""

    # -- schema

    def migrate(self) -> int:
        def work(cursor: Cursor) -> int:
            self._lock_schema(cursor)
            cursor.execute(self._dialect.format(SCHEMA_VERSION_TABLE))
            cursor.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            current = int(cursor.fetchone()[0])
            if current > LATEST_VERSION:
                raise StoreError(
                    f"the database's schema is version {current}, newer than this wattmeter's {LATEST_VERSION}: "
                    "run the newer wattmeter that wrote it (a schema is never downgraded)"
                )
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                for statement in migration.sql(self._dialect):
                    cursor.execute(statement)
                if migration.convert is not None:
                    migration.convert(cursor, self._dialect)
                cursor.execute(
                    "INSERT INTO schema_version (version, description, applied_ns) VALUES (?, ?, ?)",
                    (migration.version, migration.description, time.time_ns()),
                )
            return LATEST_VERSION

        return self._run(work, write=True)

    def schema_version(self) -> int:
        if self._dialect.name == "sqlite":
            exists = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        else:
            exists = (
                "SELECT COUNT(*) FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_name = 'schema_version'"
            )

        def work(cursor: Cursor) -> int:
            cursor.execute(exists)
            if not int(cursor.fetchone()[0]):
                return 0
            cursor.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            return int(cursor.fetchone()[0])

        return self._run(work, write=False)

    # -- writes

    def write_batch(self, batch: StoredBatch) -> WriteResult:
        return self.write_batches([batch])[0]

    def write_batches(self, batches: Sequence[StoredBatch]) -> list[WriteResult]:
        """All of ``batches`` in one transaction: one commit (one sync) for the group; see ``writes``."""
        if not batches:
            return []
        packed = [pack(batch) for batch in batches]  # before the transaction: its lock is held for SQL alone

        def work(
            cursor: Cursor,
        ) -> tuple[list[WriteResult], dict[WorkloadKey, int], dict[HostKey, int], SpanColumns]:
            results, new_refs = self._group_write.run(cursor, batches, packed, self._workloads)
            # a batch's spans and bindings commit with it (it is acknowledged after this commit), and only when the
            # batch itself is stored: a replay's are in the database already
            stored = [batch for batch, result in zip(batches, results, strict=True) if result.stored]
            spans = [span for batch in stored for span in batch.spans]
            bindings = [binding for batch in stored for binding in batch.bindings]
            new_spans, span_hosts = self._requests.write_spans(
                cursor, SpanColumns.of(spans), self._hosts, time.time_ns()
            )
            binding_hosts = self._requests.write_bindings(cursor, bindings, self._hosts)
            return results, new_refs, {**span_hosts, **binding_hosts}, new_spans

        results, new_refs, new_hosts, new_spans = self._span_write(
            work, lambda: SpanColumns.of([span for batch in batches for span in batch.spans])
        )
        self._workloads.remember(new_refs)
        self._hosts.remember(new_hosts)
        self._tell_span_listeners(new_spans)
        return results

    def write_spans(self, spans: Sequence[SpanRow]) -> int:
        return len(self.write_span_columns(SpanColumns.of(spans))) if spans else 0

    def write_span_columns(self, spans: SpanColumns) -> SpanColumns:
        if not len(spans):
            return spans
        now_ns = time.time_ns()

        def work(cursor: Cursor) -> tuple[SpanColumns, dict[HostKey, int]]:
            return self._requests.write_spans(cursor, spans, self._hosts, now_ns)

        new, new_hosts = self._span_write(work, lambda: spans)
        self._hosts.remember(new_hosts)
        self._tell_span_listeners(new)
        return new

    def _span_write(self, work: Callable[[Cursor], T], spans: Callable[[], SpanColumns]) -> T:
        """``work`` in one write transaction; when it ran more than once (a commit whose outcome was lost, retried)
        or failed, the span listeners are told that ``spans`` may be stored without their having them."""
        attempts = 0

        def counted(cursor: Cursor) -> T:
            nonlocal attempts
            attempts += 1
            return work(cursor)

        try:
            result = self._run(counted, write=True)
        except BaseException:
            if attempts:
                self._tell_missed(spans)
            raise
        if attempts > 1:
            self._tell_missed(spans)
        return result

    def add_span_listener(
        self, listener: Callable[[SpanColumns], None], missed: Callable[[dict[str, int]], None] | None = None
    ) -> None:
        self._span_listeners.append((listener, missed))

    def _tell_span_listeners(self, spans: SpanColumns) -> None:
        if not len(spans):
            return
        for listener, _ in self._span_listeners:
            try:
                listener(spans)
            except Exception:  # the spans are committed: the write stands whatever a listener does
                log.exception("a span listener failed")

    def _tell_missed(self, spans: Callable[[], SpanColumns]) -> None:
        try:  # never in place of the write's own error
            written = spans()
            latest: dict[str, int] = {}
            for host, start, end in zip(written.hostname, written.start_ns, written.end_ns, strict=True):
                latest[text(host)] = max(latest.get(text(host), start), start, end)
        except Exception:
            log.exception("a span listener could not be told of a write whose outcome was lost")
            return
        if not latest:
            return
        for _, missed in self._span_listeners:
            if missed is None:
                continue
            try:
                missed(latest)
            except Exception:
                log.exception("a span listener failed")

    def write_process_bindings(self, bindings: Sequence[ProcessBindingRow]) -> None:
        if not bindings:
            return

        def work(cursor: Cursor) -> dict[HostKey, int]:
            return self._requests.write_bindings(cursor, bindings, self._hosts)

        self._hosts.remember(self._run(work, write=True))

    def write_request_results(self, results: Sequence[RequestResult]) -> int:
        latest: dict[str, RequestResult] = {}
        for result in results:  # the last of one request id given twice
            latest[result.request_id] = result
        if not latest:
            return 0
        rows = [
            (r.request_id, r.status, r.model, r.tenant, hosts_text(r.hosts), r.start_ns, r.end_ns, r.input_tokens,
             r.output_tokens, r.active_j, r.full_j, r.gpu_j, r.cpu_j, r.dram_j, r.spans, r.updated_ns, r.co2_g, r.cost)
            for r in latest.values()
        ]  # fmt: skip
        columns = ResultColumns(*(list(column) for column in zip(*rows, strict=True)))
        stale = self._run(lambda cursor: self._requests.write_results(cursor, columns, whole=True), write=True)
        return len(rows) - len(stale)

    def write_result_columns(self, results: ResultColumns) -> list[str]:
        if not len(results):
            return []
        return self._run(lambda cursor: self._requests.write_results(cursor, results, whole=False), write=True)

    def prune(self, now_ns: int, raw_retention_s: float, rollup_retention_s: float) -> int:
        raw_cutoff = now_ns - round(raw_retention_s * 1e9)
        # a minute is older than the cutoff once it has ended by then
        last_old_minute = now_ns - round(rollup_retention_s * 1e9) - MINUTE_NS

        rollup_cutoff = now_ns - round(rollup_retention_s * 1e9)

        def work(cursor: Cursor) -> int:
            deleted = 0
            for table in ("device_chunks", "workload_chunks"):
                # host by host, so each delete reads one range of the (host_id, t_start) index
                cursor.execute(
                    f"DELETE FROM {table} WHERE host_id IN (SELECT id FROM hosts) AND t_start < ? AND t_end < ?",
                    (raw_cutoff, raw_cutoff),
                )
                deleted += max(cursor.rowcount, 0)
            cursor.execute("DELETE FROM rollups WHERE minute_ns <= ?", (last_old_minute,))
            deleted += max(cursor.rowcount, 0)
            # spans go with the raw samples they were measured against (a chunk once all its spans ended before
            # the cutoff); a request's result outlives them. Counted in spans, as rows were
            deleted += self._requests.prune_spans(cursor, raw_cutoff)
            # a request still pending whose samples are pruned, all or its first ones (a span that came hours late),
            # can never be computed whole: unknown, never 0 J; the pending ones only (the partial index)
            cursor.execute(
                "UPDATE requests SET status = 'no_samples', updated_ns = ? WHERE status = 'pending' "
                "AND (end_ns < ? OR start_ns < ?)",
                (now_ns, raw_cutoff, raw_cutoff),
            )
            cursor.execute("DELETE FROM requests WHERE start_ns < ? AND end_ns < ?", (rollup_cutoff, rollup_cutoff))
            deleted += max(cursor.rowcount, 0)
            if rollup_cutoff > raw_cutoff:  # requests kept less long than raw samples: their spans go with them
                deleted += self._requests.prune_orphan_spans(cursor, rollup_cutoff)
            # the binding of each pid in effect at the cutoff stays, however old: the agent sends a binding when it
            # changes, so a process running longer than raw_retention would lose its only one, and a span kept
            # from before the pid's next binding would be found as that one's
            cursor.execute(
                "DELETE FROM process_bindings WHERE seen_ns < ? AND EXISTS (SELECT 1 FROM process_bindings newer "
                "WHERE newer.host_ref = process_bindings.host_ref AND newer.pid = process_bindings.pid "
                "AND newer.seen_ns > process_bindings.seen_ns AND newer.seen_ns <= ?)",
                (raw_cutoff, raw_cutoff),
            )
            deleted += max(cursor.rowcount, 0)
            return deleted + prune_steps(cursor, last_old_minute, rollup_cutoff, raw_cutoff)

        return self._run(work, write=True)

    # -- reads

    def acked_sequence(self, instance_id: str) -> int:
        def work(cursor: Cursor) -> int:
            cursor.execute("SELECT watermark FROM instances WHERE instance_id = ?", (instance_id,))
            row = cursor.fetchone()
            return 0 if row is None else int(row[0])

        return self._run(work, write=False)

    def last_sample(
        self, instance_id: str, device_id: str, workload: tuple[str, str, str] | None = None
    ) -> LastSample | None:
        def work(cursor: Cursor) -> LastSample | None:
            cursor.execute("SELECT id, host_id FROM instances WHERE instance_id = ?", (instance_id,))
            row = cursor.fetchone()
            if row is None or row[1] is None:
                return None
            instance_ref, host_id = int(row[0]), int(row[1])
            if workload is None:
                cursor.execute(
                    "SELECT time_ns, energy_j FROM device_chunks "
                    "WHERE host_id = ? AND device_id = ? AND instance_ref = ? ORDER BY t_start DESC LIMIT 1",
                    (host_id, device_id, instance_ref),
                )
            else:
                ref = self._workload_ref(cursor, workload)
                if ref is None:
                    return None
                cursor.execute(
                    "SELECT time_ns, energy_j FROM workload_chunks WHERE host_id = ? AND device_id = ? "
                    "AND workload_ref = ? AND instance_ref = ? ORDER BY t_start DESC LIMIT 1",
                    (host_id, device_id, ref, instance_ref),
                )
            chunk = cursor.fetchone()
            if chunk is None:
                return None
            return LastSample(time_ns=int(unpack_times(chunk[0])[-1]), energy_j=float(unpack_values(chunk[1])[-1]))

        return self._run(work, write=False)

    @staticmethod
    def _workload_ref(cursor: Cursor, workload: WorkloadKey) -> int | None:
        cursor.execute("SELECT id FROM workloads WHERE workload = ? AND phase = ? AND job = ?", workload)
        row = cursor.fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _host_id(cursor: Cursor, hostname: str) -> int | None:
        cursor.execute("SELECT id FROM hosts WHERE hostname = ?", (hostname,))
        row = cursor.fetchone()
        return None if row is None else int(row[0])

    def hosts(self) -> list[HostRow]:
        def work(cursor: Cursor) -> list[HostRow]:
            cursor.execute(
                "SELECT device_id, kind, source, in_host_total, last_seen_ns, host_id FROM devices "
                "ORDER BY host_id, device_id"
            )
            devices: dict[int, list[DeviceRow]] = {}
            for device_id, kind, source, in_host_total, last_seen_ns, host_id in cursor.fetchall():
                devices.setdefault(int(host_id), []).append(
                    DeviceRow(device_id, kind, source, bool(in_host_total), int(last_seen_ns))
                )
            cursor.execute(
                "SELECT id, hostname, machine_id, boot_id, first_seen_ns, last_seen_ns FROM hosts ORDER BY hostname"
            )
            return [
                HostRow(hostname, machine_id, boot_id, int(first), int(last), devices.get(int(host_id), []))
                for host_id, hostname, machine_id, boot_id, first, last in cursor.fetchall()
            ]

        return self._run(work, write=False)

    def workload_energy(self, since_ns: int, until_ns: int, phase: str | None = None) -> list[WorkloadEnergyRow]:
        """Also a row with workload, phase and job all ``""``: the devices' own energy (their rollups)."""
        phase_filter = "" if phase is None else " AND w.phase = ?"
        params: tuple[Any, ...] = (since_ns, until_ns) if phase is None else (since_ns, until_ns, phase)

        def work(cursor: Cursor) -> list[tuple[Any, ...]]:
            cursor.execute(
                "SELECT h.hostname, w.workload, w.phase, w.job, r.device_id, d.in_host_total, SUM(r.energy_j) "
                "FROM rollups r JOIN hosts h ON h.id = r.host_id JOIN workloads w ON w.id = r.workload_ref "
                "LEFT JOIN devices d ON d.host_id = r.host_id AND d.device_id = r.device_id "
                "WHERE r.minute_ns >= ? AND r.minute_ns < ?" + phase_filter + " "
                "GROUP BY h.hostname, w.workload, w.phase, w.job, r.device_id, d.in_host_total",
                params,
            )
            return cursor.fetchall()

        totals: dict[tuple[str, str, str, str], tuple[list[float], dict[str, float]]] = {}
        for hostname, workload, row_phase, job, device_id, in_host_total, joules in self._run(work, write=False):
            in_total, by_device = totals.setdefault((hostname, workload, row_phase, job), ([0.0], {}))
            by_device[device_id] = float(joules)
            if in_host_total:  # a rollup of a device never seen (NULL) is not counted in the host's total
                in_total[0] += float(joules)
        return [
            WorkloadEnergyRow(hostname, workload, row_phase, job, in_total[0], by_device)
            for (hostname, workload, row_phase, job), (in_total, by_device) in sorted(totals.items())
        ]

    def device_series(self, hostname: str, device_id: str, since_ns: int, until_ns: int) -> DeviceSeries:
        def work(cursor: Cursor) -> tuple[list[Any], dict[int, list[tuple[int, int]]]]:
            host_id = self._host_id(cursor, hostname)
            if host_id is None:
                return [], {}
            cursor.execute(
                "SELECT instance_ref, sequence, t_start, t_end, time_ns, energy_j, power_w FROM device_chunks "
                "WHERE host_id = ? AND device_id = ? AND t_start < ? AND t_end >= ? "
                "ORDER BY t_start, instance_ref, sequence",
                (host_id, device_id, until_ns, since_ns),
            )
            rows = cursor.fetchall()
            cursor.execute(
                "SELECT i.id, i.watermark, s.sequence FROM instances i "
                "JOIN stored_sequences s ON s.instance_ref = i.id WHERE i.host_id = ? ORDER BY i.id, s.sequence",
                (host_id,),
            )
            stored: dict[int, tuple[int, list[int]]] = {}
            for ref, watermark, sequence in cursor.fetchall():
                stored.setdefault(int(ref), (int(watermark), []))[1].append(int(sequence))
            return rows, {ref: missing_runs(watermark, above) for ref, (watermark, above) in stored.items()}

        rows, holes = self._run(work, write=False)
        chunks = [(str(row[0]), unpack_times(row[4]), unpack_values(row[5])) for row in rows]
        times, energy = continuous_energy(chunks)
        powers = [
            np.full(len(chunk[1]), np.nan) if row[6] is None else unpack_values(row[6])
            for row, chunk in zip(rows, chunks, strict=True)
        ]
        power = np.concatenate(powers) if powers else np.empty(0)
        inside = (times >= since_ns) & (times < until_ns)
        samples = [
            (t, e, None if math.isnan(p) else p)
            for t, e, p in zip(times[inside].tolist(), energy[inside].tolist(), power[inside].tolist(), strict=True)
        ]
        spans = [(int(row[0]), int(row[1]), int(row[2]), int(row[3])) for row in rows]
        return DeviceSeries(samples, unmeasured_stretches(spans, holes, since_ns, until_ns))

    def workload_samples(
        self, hostname: str, workload: tuple[str, str, str], device_id: str, since_ns: int, until_ns: int
    ) -> list[tuple[int, float]]:
        def work(cursor: Cursor) -> list[Any]:
            host_id = self._host_id(cursor, hostname)
            ref = self._workload_ref(cursor, workload)
            if host_id is None or ref is None:
                return []
            cursor.execute(
                "SELECT instance_ref, time_ns, energy_j FROM workload_chunks "
                "WHERE host_id = ? AND device_id = ? AND workload_ref = ? AND t_start < ? AND t_end >= ? "
                "ORDER BY t_start, instance_ref, sequence",
                (host_id, device_id, ref, until_ns, since_ns),
            )
            return cursor.fetchall()

        rows = self._run(work, write=False)
        times, energy = continuous_energy((str(row[0]), unpack_times(row[1]), unpack_values(row[2])) for row in rows)
        inside = (times >= since_ns) & (times < until_ns)
        return list(zip(times[inside].tolist(), energy[inside].tolist(), strict=True))

    # names looked up go through ``text`` as stored ones did (NUL, which PostgreSQL refuses, as U+FFFD)

    def process_bindings(self, hostname: str, since_ns: int = 0) -> list[ProcessBindingRow]:
        return self._run(lambda cursor: self._requests.process_bindings(cursor, text(hostname), since_ns), write=False)

    def pending_requests(self, limit: int) -> list[str]:
        return [rid for rid, _ in self.pending_request_counts(limit)]

    def reopen_requests(self, hostname: str, since_ns: int, until_ns: int) -> dict[str, str]:
        host = text(hostname)
        return self._run(lambda cursor: self._requests.reopen(cursor, host, since_ns, until_ns), write=True)

    def pending_request_counts(self, limit: int) -> list[tuple[str, int]]:
        return self._run(lambda cursor: self._requests.pending_requests(cursor, limit), write=False)

    def request_spans(self, request_ids: Sequence[str]) -> list[SpanRow]:
        return self.request_span_columns(request_ids).spans()

    def request_span_columns(self, request_ids: Sequence[str]) -> SpanColumns:
        if not request_ids:
            return SpanColumns.empty()
        ids = [text(request_id) for request_id in request_ids]
        return self._run(lambda cursor: self._requests.request_spans(cursor, ids), write=False)

    def spans_overlapping(self, hostname: str, since_ns: int, until_ns: int) -> list[SpanRow]:
        return self.spans_overlapping_columns(hostname, since_ns, until_ns).spans()

    def spans_overlapping_columns(self, hostname: str, since_ns: int, until_ns: int) -> SpanColumns:
        return self._run(
            lambda cursor: self._requests.spans_overlapping(cursor, text(hostname), since_ns, until_ns), write=False
        )

    def latest_span_ends(self) -> dict[str, int]:
        return self._run(self._requests.latest_span_ends, write=False)

    def request_states(self, request_ids: Sequence[str]) -> dict[str, RequestState]:
        if not request_ids:
            return {}
        ids = [text(request_id) for request_id in request_ids]
        return self._run(lambda cursor: self._requests.request_states(cursor, ids), write=False)

    def spans_written_elsewhere(self, hostname: str, since_ns: int, until_ns: int) -> bool:
        return self._run(
            lambda cursor: self._requests.written_elsewhere(cursor, text(hostname), since_ns, until_ns), write=False
        )

    def request(self, request_id: str) -> RequestResult | None:
        return self._run(lambda cursor: self._requests.request(cursor, text(request_id)), write=False)

    def requests(
        self,
        model: str | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        limit: int = 100,
        order: RequestOrder = "start",
    ) -> list[RequestResult]:
        model = None if model is None else text(model)
        return self._run(
            lambda cursor: self._requests.requests(cursor, model, since_ns, until_ns, limit, order), write=False
        )

    def request_hours(self, since_ns: int, until_ns: int) -> list[RequestHourRow]:
        return self._run(lambda cursor: self._requests.request_hours(cursor, since_ns, until_ns), write=False)

    def request_summary(
        self, by: Literal["model", "tenant", "host"], since_ns: int, until_ns: int
    ) -> list[RequestSummaryRow]:
        if by not in SUMMARY_COLUMN:
            raise ValueError(f"by={by!r} is not one of {', '.join(SUMMARY_COLUMN)}")
        return self._run(lambda cursor: self._requests.request_summary(cursor, by, since_ns, until_ns), write=False)
