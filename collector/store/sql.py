"""The store's logic, in SQL that SQLite and PostgreSQL both run: dedup and the contiguous watermark, packed raw
chunks, rollup upserts, and the reads. Backends supply connections and transactions (``_run``).

Dedup is correct with several writers on one database because every write starts by upserting its agent instance's
row, which locks it (PostgreSQL: a row lock held to commit; SQLite: ``BEGIN IMMEDIATE`` locks the database), so two
writes of one instance never interleave and the second sees what the first committed.
"""

from __future__ import annotations

import abc
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from collector.store.base import (
    DeviceRow,
    HostRow,
    LastSample,
    Store,
    StoredBatch,
    StoreError,
    WorkloadEnergyRow,
    WriteResult,
    continuous_energy,
)
from collector.store.dialect import Dialect
from collector.store.migrations import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_TABLE
from collector.store.rows import PackedBatch, WorkloadKey, pack, unpack_times, unpack_values

T = TypeVar("T")
MINUTE_NS = 60_000_000_000
WATERMARK_PAGE = 256  # stored sequences read per query while advancing the watermark


class Cursor(Protocol):
    """What the logic needs of a DB-API cursor; SQL is written with ``?`` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> object: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


class SqlStore(Store):
    """``Store`` over a SQL database; subclasses open connections and run transactions."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._workload_refs: dict[WorkloadKey, int] = {}  # only ids whose row is committed
        self._refs_lock = threading.Lock()
        self._upsert_instance = dialect.format(
            """INSERT INTO instances (instance_id, host_id, watermark, first_seen_ns, last_seen_ns)
            VALUES (?, NULL, 0, ?, ?)
            ON CONFLICT (instance_id) DO UPDATE
                SET last_seen_ns = {greatest}(instances.last_seen_ns, excluded.last_seen_ns)
            RETURNING id, watermark"""
        )
        # machine and boot id follow the newest batch, so a late replay does not bring back an old boot id
        self._upsert_host = dialect.format(
            """INSERT INTO hosts (hostname, machine_id, boot_id, first_seen_ns, last_seen_ns) VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (hostname) DO UPDATE SET
                machine_id = CASE WHEN excluded.last_seen_ns >= hosts.last_seen_ns
                    THEN excluded.machine_id ELSE hosts.machine_id END,
                boot_id = CASE WHEN excluded.last_seen_ns >= hosts.last_seen_ns
                    THEN excluded.boot_id ELSE hosts.boot_id END,
                first_seen_ns = {least}(hosts.first_seen_ns, excluded.first_seen_ns),
                last_seen_ns = {greatest}(hosts.last_seen_ns, excluded.last_seen_ns)
            RETURNING id"""
        )
        self._upsert_device = dialect.format(
            """INSERT INTO devices (host_id, device_id, kind, source, in_host_total, first_seen_ns, last_seen_ns)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (host_id, device_id) DO UPDATE SET
                kind = excluded.kind,
                source = excluded.source,
                in_host_total = excluded.in_host_total,
                first_seen_ns = {least}(devices.first_seen_ns, excluded.first_seen_ns),
                last_seen_ns = {greatest}(devices.last_seen_ns, excluded.last_seen_ns)"""
        )

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
                cursor.execute(
                    "INSERT INTO schema_version (version, description, applied_ns) VALUES (?, ?, ?)",
                    (migration.version, migration.description, time.time_ns()),
                )
            return LATEST_VERSION

        return self._run(work, write=True)

    # -- writes

    def write_batch(self, batch: StoredBatch) -> WriteResult:
        packed = pack(batch)

        def work(cursor: Cursor) -> tuple[WriteResult, dict[WorkloadKey, int]]:
            cursor.execute(self._upsert_instance, (batch.instance_id, batch.received_ns, batch.received_ns))
            instance_ref, watermark = (int(value) for value in cursor.fetchone())
            if batch.sequence <= watermark or self._stored_above_watermark(cursor, instance_ref, batch.sequence):
                return WriteResult(stored=False, acked_sequence=watermark), {}
            host_id: int | None = None
            new_refs: dict[WorkloadKey, int] = {}
            if packed.has_data:
                host_id = self._write_host(cursor, batch, packed)
                refs, new_refs = self._resolve_workloads(cursor, packed.workloads)
                self._write_rows(cursor, packed, host_id, instance_ref, refs)
            # the agent holds nothing below oldest_pending: the watermark may jump to just under it
            contiguous = max(watermark, batch.oldest_pending_sequence - 1)
            if batch.sequence == contiguous + 1:
                contiguous = batch.sequence
            elif batch.sequence > contiguous:  # out of order: remembered until the watermark reaches it
                cursor.execute(
                    "INSERT INTO stored_sequences (instance_ref, sequence) VALUES (?, ?)",
                    (instance_ref, batch.sequence),
                )
            acked = self._advance(cursor, instance_ref, contiguous)
            cursor.execute(
                "DELETE FROM stored_sequences WHERE instance_ref = ? AND sequence <= ?", (instance_ref, acked)
            )
            cursor.execute(
                "UPDATE instances SET watermark = ?, host_id = COALESCE(?, host_id) WHERE id = ?",
                (acked, host_id, instance_ref),
            )
            return WriteResult(stored=True, acked_sequence=acked), new_refs

        result, new_refs = self._run(work, write=True)
        if new_refs:
            with self._refs_lock:
                self._workload_refs.update(new_refs)
        return result

    @staticmethod
    def _stored_above_watermark(cursor: Cursor, instance_ref: int, sequence: int) -> bool:
        cursor.execute(
            "SELECT 1 FROM stored_sequences WHERE instance_ref = ? AND sequence = ?", (instance_ref, sequence)
        )
        return cursor.fetchone() is not None

    @staticmethod
    def _advance(cursor: Cursor, instance_ref: int, watermark: int) -> int:
        """``watermark`` moved up through the stored sequences that follow it without a gap."""
        while True:
            cursor.execute(
                "SELECT sequence FROM stored_sequences WHERE instance_ref = ? AND sequence > ? "
                "ORDER BY sequence LIMIT ?",
                (instance_ref, watermark, WATERMARK_PAGE),
            )
            sequences = [int(row[0]) for row in cursor.fetchall()]
            for sequence in sequences:
                if sequence != watermark + 1:
                    return watermark
                watermark = sequence
            if len(sequences) < WATERMARK_PAGE:
                return watermark

    def _write_host(self, cursor: Cursor, batch: StoredBatch, packed: PackedBatch) -> int:
        host = batch.host
        seen = batch.received_ns
        cursor.execute(self._upsert_host, (host.hostname, host.machine_id, host.boot_id, seen, seen))
        host_id = int(cursor.fetchone()[0])
        if packed.devices:
            cursor.executemany(self._upsert_device, [(host_id, *device, seen, seen) for device in packed.devices])
        return host_id

    def _resolve_workloads(
        self, cursor: Cursor, keys: list[WorkloadKey]
    ) -> tuple[dict[WorkloadKey, int], dict[WorkloadKey, int]]:
        """Ids of the workloads ``keys`` names (all of them, the ones new to this store), inserting missing ones."""
        refs: dict[WorkloadKey, int] = {}
        with self._refs_lock:
            for key in keys:
                ref = self._workload_refs.get(key)
                if ref is not None:
                    refs[key] = ref
        new_refs: dict[WorkloadKey, int] = {}
        for key in keys:
            if key in refs:
                continue
            cursor.execute(
                "INSERT INTO workloads (workload, phase, job) VALUES (?, ?, ?) "
                "ON CONFLICT (workload, phase, job) DO NOTHING",
                key,
            )
            cursor.execute("SELECT id FROM workloads WHERE workload = ? AND phase = ? AND job = ?", key)
            new_refs[key] = int(cursor.fetchone()[0])
        refs.update(new_refs)
        return refs, new_refs

    @staticmethod
    def _write_rows(
        cursor: Cursor, packed: PackedBatch, host_id: int, instance_ref: int, refs: dict[WorkloadKey, int]
    ) -> None:
        if packed.device_chunks:
            cursor.executemany(
                "INSERT INTO device_chunks (host_id, instance_ref, device_id, t_start, t_end, sequence, "
                "time_ns, energy_j, power_w) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(host_id, instance_ref, *row) for row in packed.device_chunks],
            )
        if packed.workload_chunks:
            cursor.executemany(
                "INSERT INTO workload_chunks (host_id, instance_ref, workload_ref, device_id, t_start, t_end, "
                "sequence, time_ns, energy_j) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(host_id, instance_ref, refs[key], *row) for key, row in packed.workload_chunks],
            )
        if packed.rollups:
            cursor.executemany(
                "INSERT INTO rollups (minute_ns, host_id, device_id, workload_ref, energy_j) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (minute_ns, host_id, device_id, workload_ref) "
                "DO UPDATE SET energy_j = rollups.energy_j + excluded.energy_j",
                [(minute, host_id, device, refs[key], joules) for minute, device, key, joules in packed.rollups],
            )

    def prune(self, now_ns: int, raw_retention_s: float, rollup_retention_s: float) -> int:
        raw_cutoff = now_ns - round(raw_retention_s * 1e9)
        # a minute is older than the cutoff once it has ended by then
        last_old_minute = now_ns - round(rollup_retention_s * 1e9) - MINUTE_NS

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
            return deleted

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

    def device_samples(
        self, hostname: str, device_id: str, since_ns: int, until_ns: int
    ) -> list[tuple[int, float, float | None]]:
        def work(cursor: Cursor) -> list[Any]:
            host_id = self._host_id(cursor, hostname)
            if host_id is None:
                return []
            cursor.execute(
                "SELECT instance_ref, time_ns, energy_j, power_w FROM device_chunks "
                "WHERE host_id = ? AND device_id = ? AND t_start < ? AND t_end >= ? "
                "ORDER BY t_start, instance_ref, sequence",
                (host_id, device_id, until_ns, since_ns),
            )
            return cursor.fetchall()

        rows = self._run(work, write=False)
        chunks = [(str(row[0]), unpack_times(row[1]), unpack_values(row[2])) for row in rows]
        times, energy = continuous_energy(chunks)
        powers = [
            np.full(len(chunk[1]), np.nan) if row[3] is None else unpack_values(row[3])
            for row, chunk in zip(rows, chunks, strict=True)
        ]
        power = np.concatenate(powers) if powers else np.empty(0)
        inside = (times >= since_ns) & (times < until_ns)
        return [
            (t, e, None if math.isnan(p) else p)
            for t, e, p in zip(times[inside].tolist(), energy[inside].tolist(), power[inside].tolist(), strict=True)
        ]

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
