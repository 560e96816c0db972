"""Versioned schema steps, shared by both backends (types written as ``{bigint}``... and filled per dialect).

Steps are only ever appended: a database at version N gets steps N+1.. applied in order, in one transaction, and a
row in ``schema_version`` per step. Raw samples are packed: one row per (batch, device) and per (batch, workload,
device), with the batch's times and values as little-endian int64/float64 arrays, so a 10 Hz fleet writes a few
rows per host per second instead of one per reading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from collector.store.dialect import Dialect
from collector.store.spans import spans_to_chunks
from collector.store.writes import Cursor


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]
    # data the statements cannot move: run after them, in the same transaction
    convert: Callable[[Cursor, Dialect], None] | None = None

    def sql(self, dialect: Dialect) -> list[str]:
        return [dialect.format(statement) for statement in self.statements]


SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version {bigint} PRIMARY KEY,
    description TEXT NOT NULL,
    applied_ns {bigint} NOT NULL
)"""

# process_bindings' columns (schema steps 2 and 7): a pid on a host ran as a workload, seen by its agent then
_BINDING_COLUMNS = (
    "host_ref {bigint} NOT NULL, pid {bigint} NOT NULL, workload TEXT NOT NULL, phase TEXT NOT NULL, "
    "job TEXT NOT NULL, seen_ns {bigint} NOT NULL"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="hosts, devices, agent instances and their watermarks, packed raw samples, 1-minute rollups",
        statements=(
            """CREATE TABLE hosts (
                id {id_column},
                hostname TEXT NOT NULL UNIQUE,
                machine_id TEXT NOT NULL,
                boot_id TEXT NOT NULL,
                first_seen_ns {bigint} NOT NULL,
                last_seen_ns {bigint} NOT NULL
            )""",
            """CREATE TABLE devices (
                host_id {bigint} NOT NULL,
                device_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                source TEXT NOT NULL,
                in_host_total {boolean} NOT NULL,
                first_seen_ns {bigint} NOT NULL,
                last_seen_ns {bigint} NOT NULL,
                PRIMARY KEY (host_id, device_id)
            ){without_rowid}""",
            # watermark: the highest contiguous sequence stored; host_id is NULL until a batch with data arrives
            """CREATE TABLE instances (
                id {id_column},
                instance_id TEXT NOT NULL UNIQUE,
                host_id {bigint},
                watermark {bigint} NOT NULL,
                first_seen_ns {bigint} NOT NULL,
                last_seen_ns {bigint} NOT NULL
            )""",
            # sequences stored above their instance's watermark (out of order); those at or below it are deleted
            """CREATE TABLE stored_sequences (
                instance_ref {bigint} NOT NULL,
                sequence {bigint} NOT NULL,
                PRIMARY KEY (instance_ref, sequence)
            ){without_rowid}""",
            # ('', '', '') is the device's own energy in rollups
            """CREATE TABLE workloads (
                id {id_column},
                workload TEXT NOT NULL,
                phase TEXT NOT NULL,
                job TEXT NOT NULL,
                UNIQUE (workload, phase, job)
            )""",
            """CREATE TABLE device_chunks (
                host_id {bigint} NOT NULL,
                device_id TEXT NOT NULL,
                t_start {bigint} NOT NULL,
                t_end {bigint} NOT NULL,
                instance_ref {bigint} NOT NULL,
                sequence {bigint} NOT NULL,
                time_ns {blob} NOT NULL,
                energy_j {blob} NOT NULL,
                power_w {blob}
            )""",
            # by host and time, not by series: a batch's rows then land on one or two index pages, not one page
            # per series (measured: 33 pages written per batch of 8 GPUs x 3 workloads with series first, ~12 so)
            "CREATE INDEX device_chunks_by_host ON device_chunks (host_id, t_start, device_id)",
            """CREATE TABLE workload_chunks (
                host_id {bigint} NOT NULL,
                device_id TEXT NOT NULL,
                workload_ref {bigint} NOT NULL,
                t_start {bigint} NOT NULL,
                t_end {bigint} NOT NULL,
                instance_ref {bigint} NOT NULL,
                sequence {bigint} NOT NULL,
                time_ns {blob} NOT NULL,
                energy_j {blob} NOT NULL
            )""",
            "CREATE INDEX workload_chunks_by_host ON workload_chunks (host_id, t_start, device_id, workload_ref)",
            # keyed by minute first: window queries and pruning read one range, upserts touch the newest pages
            """CREATE TABLE rollups (
                minute_ns {bigint} NOT NULL,
                host_id {bigint} NOT NULL,
                device_id TEXT NOT NULL,
                workload_ref {bigint} NOT NULL,
                energy_j {real} NOT NULL,
                PRIMARY KEY (minute_ns, host_id, device_id, workload_ref)
            ){without_rowid}""",
        ),
    ),
    Migration(
        version=2,
        description="request spans, requests and their energy, process bindings",
        statements=(
            # the hosts spans and bindings name: a span's host may never have sent a batch (it is then reported
            # as having no samples), so these are not rows of hosts, whose readers expect an agent behind each
            """CREATE TABLE span_hosts (
                id {id_column},
                hostname TEXT NOT NULL UNIQUE
            )""",
            # a rowid table: rows are appended in arrival order, only the two indexes take random inserts
            """CREATE TABLE spans (
                request_id TEXT NOT NULL,
                span_id TEXT NOT NULL,
                host_ref {bigint} NOT NULL,
                start_ns {bigint} NOT NULL,
                end_ns {bigint} NOT NULL,
                workload TEXT NOT NULL,
                pid {bigint} NOT NULL,
                service_name TEXT NOT NULL,
                model TEXT NOT NULL,
                tenant TEXT NOT NULL,
                input_tokens {bigint} NOT NULL,
                output_tokens {bigint} NOT NULL,
                queue_end_ns {bigint} NOT NULL,
                prefill_end_ns {bigint} NOT NULL,
                labels TEXT NOT NULL,
                received_ns {bigint} NOT NULL,
                UNIQUE (request_id, span_id)
            )""",
            # "spans on host H overlapping [a, b]": end_ns >= a is the range read, start_ns <= b filtered in the
            # index; pruning by end_ns reads the same range host by host
            "CREATE INDEX spans_by_host ON spans (host_ref, end_ns, start_ns)",
            # hosts: a JSON array of hostnames, sorted; energies NULL while pending or without samples. A rowid
            # table, as spans: rows keyed by request id alone (WITHOUT ROWID) cost more, their wide rows inserted in
            # random key order (measured, 60,000 requests in random id order: 12.0 against 7.8 us to mark one
            # pending, 10.5 against 5.6 us to write its result)
            """CREATE TABLE requests (
                request_id TEXT NOT NULL PRIMARY KEY,
                status TEXT NOT NULL,
                model TEXT NOT NULL,
                tenant TEXT NOT NULL,
                hosts TEXT NOT NULL,
                start_ns {bigint} NOT NULL,
                end_ns {bigint} NOT NULL,
                input_tokens {bigint} NOT NULL,
                output_tokens {bigint} NOT NULL,
                active_j {real},
                full_j {real},
                gpu_j {real},
                cpu_j {real},
                dram_j {real},
                span_count {bigint} NOT NULL,
                updated_ns {bigint} NOT NULL
            )""",
            # partial: only the few pending requests are in it, so finalised ones cost it nothing
            "CREATE INDEX requests_pending ON requests (end_ns) WHERE status = 'pending'",
            # the API's windows (newest first, of a model or not) and pruning read this one; a model's requests are
            # filtered in it: an index by (model, start) cost 13.4 against 7.8 us a request marked pending (measured
            # as above)
            "CREATE INDEX requests_by_start ON requests (start_ns)",
            f"CREATE TABLE process_bindings ({_BINDING_COLUMNS}, UNIQUE (host_ref, pid, workload, phase, job))",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        version=3,
        description="training steps per workload and minute, agents' step counters, workload labels",
        statements=(
            # names as text: one row per stepping workload per host per minute, few beside the rollups
            """CREATE TABLE workload_steps (
                minute_ns {bigint} NOT NULL,
                hostname TEXT NOT NULL,
                workload TEXT NOT NULL,
                phase TEXT NOT NULL,
                job TEXT NOT NULL,
                steps {bigint} NOT NULL,
                PRIMARY KEY (minute_ns, hostname, workload, phase, job)
            ){without_rowid}""",
            # each agent instance's last cumulative count per workload: the next count's steps are counted from it
            """CREATE TABLE step_counters (
                instance_id TEXT NOT NULL,
                workload TEXT NOT NULL,
                phase TEXT NOT NULL,
                job TEXT NOT NULL,
                time_ns {bigint} NOT NULL,
                total {bigint} NOT NULL,
                PRIMARY KEY (instance_id, workload, phase, job)
            ){without_rowid}""",
            # labels: a JSON object, the whole set as last reported
            """CREATE TABLE workload_labels (
                hostname TEXT NOT NULL,
                workload TEXT NOT NULL,
                phase TEXT NOT NULL,
                job TEXT NOT NULL,
                labels TEXT NOT NULL,
                seen_ns {bigint} NOT NULL,
                PRIMARY KEY (hostname, workload, phase, job)
            ){without_rowid}""",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        version=4,
        description="requests: gCO2e and cost next to their energy",
        statements=(
            "ALTER TABLE requests ADD COLUMN co2_g {real}",
            "ALTER TABLE requests ADD COLUMN cost {real}",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        version=5,
        description="request spans stored as chunks: one row per write and host",
        statements=(
            # the spans of one host from one write, as columns (collector.store.span_chunks); "chunks on host H
            # overlapping [a, b]": max_end_ns >= a is the range read, min_start_ns <= b filtered in the index;
            # pruning reads min_end_ns there too
            """CREATE TABLE span_chunks (
                id {id_column},
                host_ref {bigint} NOT NULL,
                min_start_ns {bigint} NOT NULL,
                min_end_ns {bigint} NOT NULL,
                max_end_ns {bigint} NOT NULL,
                span_count {bigint} NOT NULL,
                received_ns {bigint} NOT NULL,
                data {blob} NOT NULL
            )""",
            "CREATE INDEX span_chunks_by_host ON span_chunks (host_ref, max_end_ns, min_start_ns, min_end_ns)",
            # where a request's spans are (their hosts as a JSON array, the earliest and latest of their times):
            # kept by span writes alone, so a result written whole never hides them; NULL: no spans
            "ALTER TABLE requests ADD COLUMN span_hosts TEXT",
            "ALTER TABLE requests ADD COLUMN span_start_ns {bigint}",
            "ALTER TABLE requests ADD COLUMN span_end_ns {bigint}",
        ),
        convert=spans_to_chunks,
    ),
    Migration(
        version=6,
        description="span chunks: which open store wrote each",
        statements=(
            # a random id per open store (SqlStore.writer_id): an aggregator's engine holds the spans its own store
            # wrote in memory and reads those that others sharing the database wrote; NULL: written before this step.
            # In the index, so that "did others write spans on H then" reads no chunk (their data comes before it)
            "ALTER TABLE span_chunks ADD COLUMN writer {bigint}",
            "DROP INDEX span_chunks_by_host",
            "CREATE INDEX span_chunks_by_host ON span_chunks (host_ref, max_end_ns, min_start_ns, min_end_ns, writer)",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        version=7,
        description="process bindings: each sighting of a pid as a workload",
        statements=(
            # a row per (pid, workload) sighting, not the newest only: a pid bound to a workload again after another
            # (a reused pid), or sent again by a restarted agent, left the earlier time resolved to the wrong one
            f"CREATE TABLE process_bindings_seen ({_BINDING_COLUMNS}, "
            "UNIQUE (host_ref, pid, seen_ns, workload, phase, job))",
            "INSERT INTO process_bindings_seen (host_ref, pid, workload, phase, job, seen_ns) "
            "SELECT host_ref, pid, workload, phase, job, seen_ns FROM process_bindings",
            "DROP TABLE process_bindings",
            "ALTER TABLE process_bindings_seen RENAME TO process_bindings",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
