"""The store's write transaction: a group of batches (one or many: group commit) stored in one transaction,
deduplicated by (agent instance, sequence), each instance's contiguous watermark moved on.

The result is what writing the batches one by one, in order, would give: two batches of one instance, even the
same (instance, sequence) twice, may be in one group. Dedup and the watermark are worked out here in Python for an
instance with nothing stored above its watermark (the usual case: its batches arrive in order), and with the
per-batch SQL for one that has (out-of-order batches waiting for a gap to fill).

Locks: a write starts by upserting its instances' rows, sorted, which locks them (PostgreSQL: row locks held to
commit; SQLite: ``BEGIN IMMEDIATE`` has locked the database), so two writes of one instance never interleave and the
second sees what the first committed. Hosts, devices, workloads and rollups follow, each sorted, so aggregators
sharing a database take row locks in one order and do not deadlock.

Rows go in multi-row statements (``ROWS_PER_STATEMENT`` rows each), not one statement per row: each statement
releases and takes back the GIL (SQLite runs without it), and a thread that wants it back waits behind the event
loop's thread for up to the switch interval, so statements, not rows, are what a group costs.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Generic, Protocol, TypeVar

from collector.store.base import StoredBatch, WriteResult
from collector.store.dialect import Dialect
from collector.store.rows import PackedBatch, WorkloadKey
from collector.store.steps import StepsWrite

ROWS_PER_STATEMENT = 500  # rows in one multi-row statement: at most 16 parameters a row (SQLite allows 32766)
WATERMARK_PAGE = 256  # stored sequences read per query while advancing the watermark
T = TypeVar("T")
K = TypeVar("K", bound=tuple[str, ...])
_Rollup = tuple[int, int, str, int, float]  # minute, host id, device, workload id, joules


class Cursor(Protocol):
    """What the logic needs of a DB-API cursor; SQL is written with ``?`` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> object: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


def _chunks(items: Sequence[T], size: int = ROWS_PER_STATEMENT) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(rows: int, row: str) -> str:
    return ", ".join([row] * rows)


def _insert(cursor: Cursor, head: str, row: str, rows: Sequence[Sequence[Any]], tail: str = "") -> None:
    """``head VALUES row, row... tail`` for ``rows``, ``ROWS_PER_STATEMENT`` at a time."""
    for chunk in _chunks(rows):
        cursor.execute(f"{head} VALUES {_marks(len(chunk), row)}{tail}", list(itertools.chain.from_iterable(chunk)))


class Refs(Generic[K]):
    """Ids of the rows of a table of names (``workloads``, ``span_hosts``), cached once their row is committed (such
    a row is never deleted)."""

    def __init__(self, table: str, columns: tuple[str, ...]) -> None:
        names = ", ".join(columns)
        self._insert = (
            f"INSERT INTO {table} ({names}) VALUES ({_marks(len(columns), '?')}) ON CONFLICT ({names}) DO NOTHING"
        )
        self._select = f"SELECT id FROM {table} WHERE " + " AND ".join(f"{column} = ?" for column in columns)
        self._refs: dict[K, int] = {}
        self._lock = threading.Lock()

    def resolve(self, cursor: Cursor, keys: Iterable[K]) -> tuple[dict[K, int], dict[K, int]]:
        """Ids of ``keys`` (all of them, and those not cached), inserting missing rows in sorted order."""
        wanted = set(keys)
        refs: dict[K, int] = {}
        with self._lock:
            for key in wanted:
                ref = self._refs.get(key)
                if ref is not None:
                    refs[key] = ref
        new_refs: dict[K, int] = {}
        for key in sorted(wanted - refs.keys()):
            cursor.execute(self._insert, key)
            cursor.execute(self._select, key)
            new_refs[key] = int(cursor.fetchone()[0])
        refs.update(new_refs)
        return refs, new_refs

    def remember(self, refs: dict[K, int]) -> None:
        """After the transaction that inserted them committed."""
        if refs:
            with self._lock:
                self._refs.update(refs)


class WorkloadRefs(Refs[WorkloadKey]):
    def __init__(self) -> None:
        super().__init__("workloads", ("workload", "phase", "job"))


@dataclass
class _Instance:
    ref: int
    watermark: int
    gapped: bool = False  # rows in stored_sequences: out-of-order batches stored above the watermark
    pending: set[int] = field(default_factory=set)  # out-of-order sequences this group stores (not gapped)
    changed: bool = False
    hostname: str | None = None  # host of its last batch with data in this group


@dataclass
class _Host:
    machine_id: str
    boot_id: str
    first_seen_ns: int
    last_seen_ns: int


class GroupWrite:
    """The statements of a write, formatted for one dialect; ``run`` is the transaction's work."""

    def __init__(self, dialect: Dialect) -> None:
        self._row_locks = dialect.row_locks
        self._steps = StepsWrite(dialect)
        self._upsert_instances = (
            "INSERT INTO instances (instance_id, host_id, watermark, first_seen_ns, last_seen_ns)",
            "(?, NULL, 0, ?, ?)",
            dialect.format(
                " ON CONFLICT (instance_id) DO UPDATE"
                " SET last_seen_ns = {greatest}(instances.last_seen_ns, excluded.last_seen_ns)"
                " RETURNING instance_id, id, watermark"
            ),
        )
        # machine and boot id follow the newest batch, so a late replay does not bring back an old boot id
        self._upsert_hosts = (
            "INSERT INTO hosts (hostname, machine_id, boot_id, first_seen_ns, last_seen_ns)",
            "(?, ?, ?, ?, ?)",
            dialect.format(
                """ ON CONFLICT (hostname) DO UPDATE SET
                machine_id = CASE WHEN excluded.last_seen_ns >= hosts.last_seen_ns
                    THEN excluded.machine_id ELSE hosts.machine_id END,
                boot_id = CASE WHEN excluded.last_seen_ns >= hosts.last_seen_ns
                    THEN excluded.boot_id ELSE hosts.boot_id END,
                first_seen_ns = {least}(hosts.first_seen_ns, excluded.first_seen_ns),
                last_seen_ns = {greatest}(hosts.last_seen_ns, excluded.last_seen_ns)
                RETURNING hostname, id"""
            ),
        )
        self._upsert_devices = dialect.format(
            """ ON CONFLICT (host_id, device_id) DO UPDATE SET
                kind = excluded.kind,
                source = excluded.source,
                in_host_total = excluded.in_host_total,
                first_seen_ns = {least}(devices.first_seen_ns, excluded.first_seen_ns),
                last_seen_ns = {greatest}(devices.last_seen_ns, excluded.last_seen_ns)"""
        )
        # the watermark, and the host of the instance's last batch with data (NULL: keep it)
        self._update_instances = (
            dialect.format(
                "UPDATE instances SET watermark = v.column2, host_id = COALESCE(v.column3, instances.host_id) FROM ("
            ),
            dialect.format("(CAST(? AS {bigint}), CAST(? AS {bigint}), CAST(? AS {bigint}))"),
        )

    def run(
        self, cursor: Cursor, batches: Sequence[StoredBatch], packed: Sequence[PackedBatch], workloads: WorkloadRefs
    ) -> tuple[list[WriteResult], dict[WorkloadKey, int]]:
        """Store ``batches`` (``packed``: their rows) in ``cursor``'s transaction; returns one result per batch and
        the workload ids it inserted (for ``WorkloadRefs.remember`` once committed)."""
        instances = self._lock_instances(cursor, batches)
        results: list[WriteResult] = []
        with_data: list[tuple[StoredBatch, PackedBatch, _Instance]] = []
        for batch, rows in zip(batches, packed, strict=True):
            instance = instances[batch.instance_id]
            if instance.gapped:
                acked = self._sequence_in_sql(cursor, instance, batch)
            else:
                acked = self._sequence(instance, batch)
            if acked is None:
                results.append(WriteResult(stored=False, acked_sequence=instance.watermark))
                continue
            results.append(WriteResult(stored=True, acked_sequence=acked))
            instance.changed = True
            if rows.has_data:
                instance.hostname = batch.host.hostname
                with_data.append((batch, rows, instance))
        host_ids = self._write_hosts(cursor, with_data)
        new_refs = self._write_rows(cursor, with_data, host_ids, workloads, self._row_locks)
        changed = sorted((i for i in instances.values() if i.changed), key=lambda i: i.ref)
        head, row = self._update_instances
        for chunk in _chunks(changed):
            params = [
                value
                for i in chunk
                for value in (i.ref, i.watermark, None if i.hostname is None else host_ids[i.hostname])
            ]
            cursor.execute(f"{head}VALUES {_marks(len(chunk), row)}) AS v WHERE instances.id = v.column1", params)
        out_of_order = [(i.ref, sequence) for i in changed for sequence in sorted(i.pending)]
        if out_of_order:
            cursor.executemany("INSERT INTO stored_sequences (instance_ref, sequence) VALUES (?, ?)", out_of_order)
        self._steps.write(cursor, batches, results)
        return results, new_refs

    def _lock_instances(self, cursor: Cursor, batches: Sequence[StoredBatch]) -> dict[str, _Instance]:
        first_seen: dict[str, int] = {}
        last_seen: dict[str, int] = {}
        for batch in batches:
            first_seen.setdefault(batch.instance_id, batch.received_ns)
            last_seen[batch.instance_id] = max(last_seen.get(batch.instance_id, 0), batch.received_ns)
        head, row, tail = self._upsert_instances
        instances: dict[str, _Instance] = {}
        for ids in _chunks(sorted(first_seen)):
            params = [value for i in ids for value in (i, first_seen[i], last_seen[i])]
            cursor.execute(f"{head} VALUES {_marks(len(ids), row)}{tail}", params)
            for instance_id, ref, watermark in cursor.fetchall():
                instances[instance_id] = _Instance(int(ref), int(watermark))
        by_ref = {instance.ref: instance for instance in instances.values()}
        for refs in _chunks(sorted(by_ref)):
            cursor.execute(
                f"SELECT id FROM instances WHERE id IN ({_marks(len(refs), '?')}) "
                "AND EXISTS (SELECT 1 FROM stored_sequences s WHERE s.instance_ref = instances.id)",
                refs,
            )
            for (ref,) in cursor.fetchall():
                by_ref[int(ref)].gapped = True
        return instances

    @staticmethod
    def _sequence(instance: _Instance, batch: StoredBatch) -> int | None:
        """The new watermark once ``batch`` is stored; None: a duplicate. For an instance with nothing in
        stored_sequences but what this group adds (``pending``, inserted at the end)."""
        sequence = batch.sequence
        if sequence <= instance.watermark or sequence in instance.pending:
            return None
        # the agent holds nothing below oldest_pending: the watermark may jump to just under it
        contiguous = max(instance.watermark, batch.oldest_pending_sequence - 1)
        if sequence == contiguous + 1:
            contiguous = sequence
        elif sequence > contiguous:  # out of order: remembered until the watermark reaches it
            instance.pending.add(sequence)
        while contiguous + 1 in instance.pending:
            contiguous += 1
        if instance.pending:
            instance.pending = {s for s in instance.pending if s > contiguous}
        instance.watermark = contiguous
        return contiguous

    @classmethod
    def _sequence_in_sql(cls, cursor: Cursor, instance: _Instance, batch: StoredBatch) -> int | None:
        """``_sequence`` for an instance with out-of-order batches in stored_sequences, read and written there."""
        sequence, ref = batch.sequence, instance.ref
        if sequence <= instance.watermark:
            return None
        cursor.execute("SELECT 1 FROM stored_sequences WHERE instance_ref = ? AND sequence = ?", (ref, sequence))
        if cursor.fetchone() is not None:
            return None
        contiguous = max(instance.watermark, batch.oldest_pending_sequence - 1)
        if sequence == contiguous + 1:
            contiguous = sequence
        elif sequence > contiguous:
            cursor.execute("INSERT INTO stored_sequences (instance_ref, sequence) VALUES (?, ?)", (ref, sequence))
        acked = cls._advance(cursor, ref, contiguous)
        cursor.execute("DELETE FROM stored_sequences WHERE instance_ref = ? AND sequence <= ?", (ref, acked))
        instance.watermark = acked
        return acked

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

    def _write_hosts(
        self, cursor: Cursor, with_data: list[tuple[StoredBatch, PackedBatch, _Instance]]
    ) -> dict[str, int]:
        """Upsert the hosts and devices of the stored batches with data; returns hostname -> host id."""
        hosts: dict[str, _Host] = {}
        for batch, _, _ in with_data:
            seen = batch.received_ns
            host = hosts.get(batch.host.hostname)
            if host is None:
                hosts[batch.host.hostname] = _Host(batch.host.machine_id, batch.host.boot_id, seen, seen)
                continue
            if seen >= host.last_seen_ns:  # the newest batch names the machine and boot (a later one on ties)
                host.machine_id, host.boot_id, host.last_seen_ns = batch.host.machine_id, batch.host.boot_id, seen
            host.first_seen_ns = min(host.first_seen_ns, seen)
        head, row, tail = self._upsert_hosts
        host_ids: dict[str, int] = {}
        for chunk in _chunks(sorted(hosts)):
            params = [
                value
                for name in chunk
                for value in (name, hosts[name].machine_id, hosts[name].boot_id, hosts[name].first_seen_ns,
                              hosts[name].last_seen_ns)
            ]  # fmt: skip
            cursor.execute(f"{head} VALUES {_marks(len(chunk), row)}{tail}", params)
            host_ids.update((str(name), int(host_id)) for name, host_id in cursor.fetchall())
        # (host, device) -> kind, source, in_host_total of the last batch naming it; first and last seen over all
        devices: dict[tuple[int, str], tuple[str, str, bool, int, int]] = {}
        for batch, rows, _ in with_data:
            host_id, seen = host_ids[batch.host.hostname], batch.received_ns
            for device_id, kind, source, in_host_total in rows.devices:
                known = devices.get((host_id, device_id))
                if known is None:
                    devices[(host_id, device_id)] = (kind, source, in_host_total, seen, seen)
                else:
                    devices[(host_id, device_id)] = (
                        kind,
                        source,
                        in_host_total,
                        min(known[3], seen),
                        max(known[4], seen),
                    )
        _insert(
            cursor,
            "INSERT INTO devices (host_id, device_id, kind, source, in_host_total, first_seen_ns, last_seen_ns)",
            "(?, ?, ?, ?, ?, ?, ?)",
            [key + values for key, values in sorted(devices.items())],
            self._upsert_devices,
        )
        return host_ids

    @staticmethod
    def _write_rows(
        cursor: Cursor,
        with_data: list[tuple[StoredBatch, PackedBatch, _Instance]],
        host_ids: dict[str, int],
        workloads: WorkloadRefs,
        row_locks: bool,
    ) -> dict[WorkloadKey, int]:
        keys = sorted({key for _, rows, _ in with_data for key in rows.workloads})
        refs, new_refs = workloads.resolve(cursor, keys)
        device_chunks: list[tuple[Any, ...]] = []
        workload_chunks: list[tuple[Any, ...]] = []
        rollups: list[_Rollup] = []
        for batch, rows, instance in with_data:
            ids = (host_ids[batch.host.hostname], instance.ref)
            host_id = ids[0]
            device_chunks += [ids + row for row in rows.device_chunks]
            workload_chunks += [(*ids, refs[key], *row) for key, row in rows.workload_chunks]
            rollups += [(minute, host_id, device, refs[key], joules) for minute, device, key, joules in rows.rollups]
        _insert(
            cursor,
            "INSERT INTO device_chunks (host_id, instance_ref, device_id, t_start, t_end, sequence, time_ns, energy_j, "
            "power_w)",
            "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            device_chunks,
        )
        _insert(
            cursor,
            "INSERT INTO workload_chunks (host_id, instance_ref, workload_ref, device_id, t_start, t_end, sequence, "
            "time_ns, energy_j)",
            "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            workload_chunks,
        )
        for round_ in _rounds(rollups) if row_locks else [rollups]:
            _insert(
                cursor,
                "INSERT INTO rollups (minute_ns, host_id, device_id, workload_ref, energy_j)",
                "(?, ?, ?, ?, ?)",
                round_,
                " ON CONFLICT (minute_ns, host_id, device_id, workload_ref) "
                "DO UPDATE SET energy_j = rollups.energy_j + excluded.energy_j",
            )
        return new_refs


_BUCKET = itemgetter(0, 1, 2, 3)


def _rounds(rollups: list[_Rollup]) -> list[list[_Rollup]]:
    """Rollup increments in rounds that name each bucket once (an upsert statement may name a row once, on
    PostgreSQL), each sorted by bucket (the order row locks are taken in); increments to one bucket stay in batch
    order, so they add up as one by one would. SQLite takes one statement naming a bucket twice in order."""
    rounds: list[list[_Rollup]] = []
    seen: dict[tuple[int, int, str, int], int] = {}
    for rollup in rollups:
        bucket = rollup[:4]
        n = seen.get(bucket, 0)
        seen[bucket] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(rollup)
    for round_ in rounds:
        round_.sort(key=_BUCKET)
    return rounds
