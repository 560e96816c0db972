"""The aggregator's storage interface: what ingest writes and what the HTTP API and reports read.

Ingest (collector.aggregator) validates a batch, works out its rollup increments and hands the store one
``StoredBatch``; the store writes it in one transaction, deduplicated by (agent instance, sequence), and only then
is the batch acknowledged. SQLite (one process, the default) and PostgreSQL (several aggregators on one database)
implement the same ``Store``.

Energy values in raw chunks are the agent instance's cumulative counters: they never go backwards within an
instance, but start anywhere (a device counter may start at the hardware's own value, a workload's at 0). Readers
that want one continuous counter per (host, device) across agent restarts use ``continuous_energy``.
"""

from __future__ import annotations

import abc
import bisect
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from collector.errors import WattmeterError
from collector.store.rows import PackedBatch

Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]


class StoreError(WattmeterError):
    """The store cannot be opened or used (bad URL, unreadable file, server unreachable); the message says how to
    fix it. A write that raised it is not known to be stored: do not acknowledge the batch (its replay is deduplicated).
    """


class StoreMissing(StoreError):
    """Opened with ``create=False`` and there is no database there (nothing was created)."""


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    machine_id: str = ""
    boot_id: str = ""


@dataclass(frozen=True)
class DeviceChunk:
    """One device's samples from one batch, time ascending (Unix ns)."""

    device_id: str
    kind: str  # gpu | cpu | dram
    source: str
    in_host_total: bool
    time_ns: Int64Array
    energy_j: Float64Array  # the agent instance's cumulative counter
    power_w: Float64Array | None  # NaN where the device gave none; None: no power at all in this chunk


@dataclass(frozen=True)
class WorkloadChunk:
    """One workload's cumulative energy on one device from one batch, time ascending."""

    workload: str
    phase: str
    job: str
    device_id: str
    time_ns: Int64Array
    energy_j: Float64Array


@dataclass(frozen=True)
class RollupIncrement:
    """Joules to add to one 1-minute bucket. ``workload == phase == job == ""`` with ``special == ""``: the device's
    own energy; otherwise one workload's (``special`` names idle/system/other, whose ``workload`` is the same)."""

    minute_ns: int  # start of the minute, Unix ns, a multiple of 60e9
    device_id: str
    workload: str
    phase: str
    job: str
    energy_j: float


@dataclass(frozen=True)
class StoredBatch:
    instance_id: str
    sequence: int
    oldest_pending_sequence: int  # the agent holds nothing below this: contiguity may jump to it
    host: HostInfo
    received_ns: int
    devices: Sequence[DeviceChunk] = ()
    workloads: Sequence[WorkloadChunk] = ()
    rollups: Sequence[RollupIncrement] = ()
    raw_bytes: int = 0  # size on the wire, for accounting
    # the same content already packed as rows (ingest packs in its worker processes); devices, workloads and rollups
    # are then empty
    packed: PackedBatch | None = None
    # the batch's request spans (hostname filled in) and pid -> workload bindings, stored in the same transaction
    spans: Sequence[SpanRow] = ()
    bindings: Sequence[ProcessBindingRow] = ()
    # training steps (cumulative per workload) and workload labels, stored in the same transaction too
    steps: Sequence[StepSeriesRow] = ()
    workload_labels: Sequence[WorkloadLabelsRow] = ()

    def __post_init__(self) -> None:
        if self.packed is not None and (self.devices or self.workloads or self.rollups):
            raise ValueError("a StoredBatch has either chunks and rollups or packed rows, not both")


@dataclass(frozen=True)
class WriteResult:
    stored: bool  # False: a duplicate (already stored), nothing written
    acked_sequence: int  # highest contiguous sequence stored for the instance, after this write


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    kind: str
    source: str
    in_host_total: bool
    last_seen_ns: int


@dataclass(frozen=True)
class HostRow:
    hostname: str
    machine_id: str
    boot_id: str
    first_seen_ns: int
    last_seen_ns: int
    devices: list[DeviceRow] = field(default_factory=list)


@dataclass(frozen=True)
class WorkloadEnergyRow:
    """Energy of one workload on one host over a window, from the 1-minute rollups."""

    hostname: str
    workload: str
    phase: str
    job: str
    energy_j: float  # over devices with in_host_total
    by_device_j: dict[str, float]  # every device, parts of packages included


@dataclass(frozen=True)
class LastSample:
    time_ns: int
    energy_j: float


SpanKey = tuple[str, str]  # (request_id, span_id)

RequestStatus = Literal["pending", "final", "approximate", "no_samples"]


@dataclass(frozen=True)
class SpanRow:
    """One request span as received (client library via an agent's stream, ``ReportSpans`` or OTLP), identified by
    (``request_id``, ``span_id``): a span stored twice is stored once. ``span_id`` is the sender's (the client's
    random id, the OTLP span id in hex) or, when it gave none, one derived from the span's host, workload, pid and
    times (``derived_span_id``). Times are Unix ns; 0 for ``queue_end_ns`` / ``prefill_end_ns`` means unknown.
    ``workload`` is the sender's explicit workload name ("" when none: the engine resolves it by ``pid`` through the
    host's process bindings, then by ``service_name``)."""

    request_id: str
    span_id: str
    hostname: str
    start_ns: int
    end_ns: int
    workload: str = ""
    pid: int = 0
    service_name: str = ""
    model: str = ""
    tenant: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    queue_end_ns: int = 0
    prefill_end_ns: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    received_ns: int = 0


SPAN_FIELDS = (
    "request_id", "span_id", "hostname", "start_ns", "end_ns", "workload", "pid", "service_name", "model", "tenant",
    "input_tokens", "output_tokens", "queue_end_ns", "prefill_end_ns", "labels", "received_ns",
)  # fmt: skip


@dataclass(frozen=True)
class SpanColumns:
    """Spans as parallel columns, one list per ``SpanRow`` field (``labels`` as JSON text, ``"{}"`` when none): what
    ``ReportSpans`` and OTLP build from a call, the store writes with one ``executemany`` and the request engine keeps
    in memory, with no object per span."""

    request_id: list[str]
    span_id: list[str]
    hostname: list[str]
    start_ns: list[int]
    end_ns: list[int]
    workload: list[str]
    pid: list[int]
    service_name: list[str]
    model: list[str]
    tenant: list[str]
    input_tokens: list[int]
    output_tokens: list[int]
    queue_end_ns: list[int]
    prefill_end_ns: list[int]
    labels: list[str]
    received_ns: list[int]

    def __len__(self) -> int:
        return len(self.request_id)

    def columns(self) -> tuple[list[Any], ...]:
        return tuple(getattr(self, name) for name in SPAN_FIELDS)

    @classmethod
    def empty(cls) -> SpanColumns:
        return cls(*([] for _ in SPAN_FIELDS))

    @classmethod
    def of(cls, spans: Iterable[SpanRow]) -> SpanColumns:
        rows = [
            (s.request_id, s.span_id, s.hostname, s.start_ns, s.end_ns, s.workload, s.pid, s.service_name, s.model,
             s.tenant, s.input_tokens, s.output_tokens, s.queue_end_ns, s.prefill_end_ns, labels_json(s.labels),
             s.received_ns)
            for s in spans
        ]  # fmt: skip
        return cls.of_rows(rows)

    @classmethod
    def of_rows(cls, rows: Sequence[Sequence[Any]]) -> SpanColumns:
        """Rows in ``SPAN_FIELDS`` order as columns."""
        if not rows:
            return cls.empty()
        return cls(*(list(column) for column in zip(*rows, strict=True)))

    def take(self, indices: Iterable[int]) -> SpanColumns:
        chosen = list(indices)
        return SpanColumns(*([column[i] for i in chosen] for column in self.columns()))

    def rows(self) -> list[tuple[Any, ...]]:
        return list(zip(*self.columns(), strict=True))

    def spans(self) -> list[SpanRow]:
        return [
            SpanRow(
                *row[:14],  # type: ignore[misc]  # SPAN_FIELDS is SpanRow's fields in order
                labels={} if row[14] == "{}" else dict(json.loads(row[14])),
                received_ns=row[15],
            )
            for row in zip(*self.columns(), strict=True)
        ]

    @staticmethod
    def concat(parts: Sequence[SpanColumns]) -> SpanColumns:
        if len(parts) == 1:
            return parts[0]
        return SpanColumns(*([v for part in parts for v in getattr(part, name)] for name in SPAN_FIELDS))


def labels_json(labels: dict[str, str]) -> str:
    """A span's labels as stored: JSON with sorted keys, ``"{}"`` when none."""
    return json.dumps(labels, sort_keys=True, ensure_ascii=False, separators=(",", ":")) if labels else "{}"


@dataclass(frozen=True)
class ResultColumns:
    """Request results as parallel columns (``RequestResult``'s fields; ``hosts`` as a sorted JSON array), written
    with one ``executemany``. ``span_count``: the spans each was computed from (the stale-result guard)."""

    request_id: list[str]
    status: list[str]
    model: list[str]
    tenant: list[str]
    hosts: list[str]
    start_ns: list[int]
    end_ns: list[int]
    input_tokens: list[int]
    output_tokens: list[int]
    active_j: list[float | None]
    full_j: list[float | None]
    gpu_j: list[float | None]
    cpu_j: list[float | None]
    dram_j: list[float | None]
    span_count: list[int]
    updated_ns: list[int]
    # gCO2e and cost of each request's active energy (None: no [carbon], or no energy; see RequestResult); left
    # empty: None for all
    co2_g: list[float | None] = field(default_factory=list)
    cost: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("co2_g", "cost"):
            if not getattr(self, name):
                object.__setattr__(self, name, [None] * len(self.request_id))

    def __len__(self) -> int:
        return len(self.request_id)

    def rows(self) -> list[tuple[Any, ...]]:
        return list(zip(*(getattr(self, f.name) for f in fields(self)), strict=True))


@dataclass(frozen=True)
class ProcessBindingRow:
    """A pid on a host ran as a workload, as the host's agent reported (``Batch.processes``) at ``seen_ns``."""

    hostname: str
    pid: int
    workload: str
    phase: str
    job: str
    seen_ns: int


@dataclass(frozen=True)
class StepSeriesRow:
    """A workload's cumulative training steps in one batch, time ascending (Unix ns): the agent instance's count
    (``collector.client.step()``), which the store turns into steps per minute. A count below the one before it:
    the agent's count started again from 0."""

    workload: str
    phase: str
    job: str
    time_ns: tuple[int, ...]
    count: tuple[int, ...]


@dataclass(frozen=True)
class WorkloadLabelsRow:
    """The whole set of labels a workload's processes registered with, as the agent knew it at ``seen_ns``."""

    workload: str
    phase: str
    job: str
    labels: dict[str, str]
    seen_ns: int


@dataclass(frozen=True)
class WorkloadStepsRow:
    """Training steps of one workload on one host in the minutes starting in a window; ``minutes``: how many of
    those minutes had steps."""

    hostname: str
    workload: str
    phase: str
    job: str
    steps: int
    minutes: int


@dataclass(frozen=True)
class StoredLabelsRow:
    """A workload's labels on a host, as last reported (``seen_ns``: when its agent made that batch)."""

    hostname: str
    workload: str
    phase: str
    job: str
    labels: dict[str, str]
    seen_ns: int


RequestState = tuple[str, float | None, float | None, int]  # a stored request's status, active_j, full_j and spans


@dataclass(frozen=True)
class RequestResult:
    """One request's energy, summed over its spans (a request may have spans on several hosts).

    ``active_j``: the measured energy of the workloads while they served it (their energy split among the
    requests active at each instant); ``gpu_j + cpu_j + dram_j == active_j``. ``full_j``: ``active_j`` plus the
    request's share of the idle energy of the devices its workloads used, times the configured PUE. Energies are
    None while ``status`` is ``pending`` or when it is ``no_samples`` (the host sent no samples for the time of the
    request: unknown, never 0 J). ``approximate``: computed when ``finalize_grace_s`` ran out before samples past
    its end arrived for every device (a lower bound where samples are missing)."""

    request_id: str
    status: RequestStatus
    model: str = ""
    tenant: str = ""
    hosts: tuple[str, ...] = ()
    start_ns: int = 0
    end_ns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    active_j: float | None = None
    full_j: float | None = None
    gpu_j: float | None = None
    cpu_j: float | None = None
    dram_j: float | None = None
    spans: int = 0  # the spans it was computed from (a result from fewer than are stored is stale: not written)
    updated_ns: int = 0
    # gCO2e and cost (in the [carbon] currency) of ``active_j`` at the grid's intensity and price over the request's
    # time (averaged evenly over it), times the [carbon] pue; None without [carbon] (or without a price for cost),
    # or without energy
    co2_g: float | None = None
    cost: float | None = None

    @property
    def joules_per_output_token(self) -> float | None:
        if self.active_j is None or self.output_tokens <= 0:
            return None
        return self.active_j / self.output_tokens


@dataclass(frozen=True)
class RequestSummaryRow:
    """Requests of one group (a model, tenant or host) that are final or approximate, over a window."""

    group: str
    count: int
    energy_j: float  # active J, summed
    p50_j: float
    p95_j: float
    output_tokens: int
    joules_per_output_token: float | None  # energy_j / output_tokens; None without tokens


@dataclass(frozen=True)
class RequestHourRow:
    """Final and approximate requests of one model that started in one UTC hour (``hour_ns``: its start)."""

    model: str
    hour_ns: int
    count: int
    energy_j: float  # active J, summed


@dataclass(frozen=True)
class DeviceSeries:
    """One device's stored samples over a window (``Store.device_samples``) and the stretches they join without
    having measured them (``Store.unmeasured_times``)."""

    samples: list[tuple[int, float, float | None]]
    unmeasured: list[tuple[int, int]]


class Store(abc.ABC):
    """Storage behind the aggregator. Methods may be called from several threads; each call is one transaction."""

    @abc.abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema to the latest version; returns that version. Safe to call every start."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version the database holds (0: no wattmeter schema at all), read without changing anything:
        for readers that must not migrate (``wattmeter report``)."""

    @abc.abstractmethod
    def write_batch(self, batch: StoredBatch) -> WriteResult:
        """Store ``batch`` durably (committed, and synced where the backend allows) in one transaction, unless
        (instance, sequence) is already stored. Updates the instance's contiguous watermark."""

    def write_batches(self, batches: Sequence[StoredBatch]) -> list[WriteResult]:
        """``write_batch`` of each of ``batches``, in order; one result each. Backends write them in one
        transaction (group commit: one sync for all); this default writes them one by one. When it raises, which of
        them were stored is not known: write them again (each alone, to find the one that fails), which dedup makes
        safe. Two batches of one instance, even the same (instance, sequence) twice, may be in one call."""
        return [self.write_batch(batch) for batch in batches]

    @abc.abstractmethod
    def acked_sequence(self, instance_id: str) -> int:
        """Highest contiguous sequence stored for ``instance_id``; 0 when none."""

    @abc.abstractmethod
    def last_sample(
        self, instance_id: str, device_id: str, workload: tuple[str, str, str] | None = None
    ) -> LastSample | None:
        """The last stored sample of a device series (``workload`` None) or of a workload series on that device, for
        ``instance_id``; None when there is none. Ingest uses it after a restart to check counters never go back."""

    @abc.abstractmethod
    def hosts(self) -> list[HostRow]:
        """Every host seen, with its devices."""

    @abc.abstractmethod
    def workload_energy(self, since_ns: int, until_ns: int, phase: str | None = None) -> list[WorkloadEnergyRow]:
        """Per (host, workload, phase, job): joules in the rollup minutes starting in [since_ns, until_ns)."""

    @abc.abstractmethod
    def device_series(self, hostname: str, device_id: str, since_ns: int, until_ns: int) -> DeviceSeries:
        """One device's samples in [since_ns, until_ns) and the stretches they join unmeasured, from one read."""

    def device_samples(
        self, hostname: str, device_id: str, since_ns: int, until_ns: int
    ) -> list[tuple[int, float, float | None]]:
        """Raw samples ``(t_ns, energy_j, power_w)`` of one device with since_ns <= t_ns < until_ns, time ascending,
        energy continuous across agent restarts (``continuous_energy``), power None where there was none."""
        return self.device_series(hostname, device_id, since_ns, until_ns).samples

    def unmeasured_times(self, hostname: str, device_id: str, since_ns: int, until_ns: int) -> list[tuple[int, int]]:
        """Stretches ``(after_ns, before_ns)`` overlapping [since_ns, until_ns) that one device's stored samples
        join but did not measure: from one agent instance's last sample to the next one's first (a restart:
        ``continuous_energy`` counts nothing there), and over batches of an instance not stored yet (its sequences
        stored out of order: the hole above its contiguous watermark). Time ascending."""
        return self.device_series(hostname, device_id, since_ns, until_ns).unmeasured

    @abc.abstractmethod
    def workload_samples(
        self, hostname: str, workload: tuple[str, str, str], device_id: str, since_ns: int, until_ns: int
    ) -> list[tuple[int, float]]:
        """Raw samples ``(t_ns, energy_j)`` of one workload on one device, like ``device_samples``."""

    # Request spans and energy per request (issue 5). The engine (collector.aggregator.request_engine) is the only
    # writer of results; ingest, ReportSpans and OTLP write spans and bindings.

    @abc.abstractmethod
    def write_spans(self, spans: Sequence[SpanRow]) -> int:
        """Store ``spans`` in one transaction, ignoring those whose (request_id, span_id) is stored already; returns
        how many were new. Each new span's request becomes ``pending`` (again, if it had a result: its energies are
        dropped); while pending, its row says what its spans say (model, tenant, hosts, times, summed tokens, the
        number of spans)."""

    @abc.abstractmethod
    def write_process_bindings(self, bindings: Sequence[ProcessBindingRow]) -> None:
        """Upsert pid -> workload bindings per host, keeping the newest ``seen_ns`` for each (host, pid, workload)."""

    @abc.abstractmethod
    def process_bindings(self, hostname: str, since_ns: int = 0) -> list[ProcessBindingRow]:
        """The host's bindings seen at or after ``since_ns``, oldest first."""

    @abc.abstractmethod
    def pending_requests(self, limit: int) -> list[str]:
        """Up to ``limit`` request ids whose status is ``pending``, oldest span end first."""

    @abc.abstractmethod
    def request_spans(self, request_ids: Sequence[str]) -> list[SpanRow]:
        """Every stored span of those requests, by request id and span id."""

    @abc.abstractmethod
    def spans_overlapping(self, hostname: str, since_ns: int, until_ns: int) -> list[SpanRow]:
        """Every span on ``hostname`` with start_ns <= until_ns and end_ns >= since_ns (the neighbours of a request
        that shared its workloads' energy), whatever their requests' status, by end."""

    @abc.abstractmethod
    def write_request_results(self, results: Sequence[RequestResult]) -> int:
        """Upsert results by request_id in one transaction; returns how many were written. A result whose
        ``spans`` is fewer than the spans stored for its request now is stale (a span arrived after they were
        read) and is not written: the request stays ``pending``, to be computed again."""

    # The columnar forms the ingest paths and the engine use (no object per span or per request).

    @abc.abstractmethod
    def write_span_columns(self, spans: SpanColumns) -> SpanColumns:
        """``write_spans`` of columns; returns the spans that were new (``spans`` itself when all were), which it
        also hands, once committed, to every span listener (``add_span_listener``)."""

    @abc.abstractmethod
    def add_span_listener(
        self, listener: Callable[[SpanColumns], None], missed: Callable[[dict[str, int]], None] | None = None
    ) -> None:
        """Call ``listener`` with the new spans of every span write of this store object (``write_spans``,
        ``write_span_columns``, ``write_batches``), after its commit, on the writing thread; an exception it raises
        is logged, never the write's. The request engine keeps recent spans in memory so. ``missed``: called with,
        per hostname, the latest end of a write's spans when some of them may be stored without ``listener`` having
        them: a commit whose outcome was lost (retried, or failed), an earlier attempt may have stored them."""

    @abc.abstractmethod
    def pending_request_counts(self, limit: int) -> list[tuple[str, int]]:
        """``pending_requests`` with the number of spans stored for each."""

    @abc.abstractmethod
    def request_span_columns(self, request_ids: Sequence[str]) -> SpanColumns:
        """``request_spans`` as columns."""

    @abc.abstractmethod
    def spans_overlapping_columns(self, hostname: str, since_ns: int, until_ns: int) -> SpanColumns:
        """``spans_overlapping`` as columns."""

    @abc.abstractmethod
    def request_states(self, request_ids: Sequence[str]) -> dict[str, RequestState]:
        """Per stored one of ``request_ids``: its status, active_j, full_j and span count (the engine asks of its
        neighbours: what they hold, and whether its memory has all their spans)."""

    @abc.abstractmethod
    def spans_written_elsewhere(self, hostname: str, since_ns: int, until_ns: int) -> bool:
        """Whether spans of ``hostname`` that may overlap [since_ns, until_ns] were stored by another open store
        than this one: another aggregator sharing the database, or this one before it reopened the store (the
        spans this store wrote are those handed to its span listeners)."""

    @abc.abstractmethod
    def latest_span_ends(self) -> dict[str, int]:
        """Per hostname, the latest ``end_ns`` of its stored spans (the engine's start: what it has not seen)."""

    @abc.abstractmethod
    def write_result_columns(self, results: ResultColumns) -> list[str]:
        """The engine's results, as columns (one row per request id), in one transaction; returns the ids not
        written because they were stale (computed from fewer spans than are stored now: they stay ``pending``). A
        stored request gets its status, hosts, energies and ``updated_ns``: its model, tenant, times, tokens and
        span count are what its stored spans say already (a request not stored gets the whole row)."""

    @abc.abstractmethod
    def reopen_requests(self, hostname: str, since_ns: int, until_ns: int) -> dict[str, str]:
        """Make ``approximate`` and ``no_samples`` requests with a span on ``hostname`` overlapping
        [since_ns, until_ns] ``pending`` again (energies dropped), because samples of that time arrived after their
        grace (an agent replaying its spool after an outage); returns them, each with the status it had (the
        engine computes them again, and counts them once: ``RequestEngine.note_requests_reopened``)."""

    @abc.abstractmethod
    def request(self, request_id: str) -> RequestResult | None:
        """The request's current result (``pending`` when only its spans are known); None when unknown."""

    @abc.abstractmethod
    def requests(
        self,
        model: str | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        limit: int = 100,
        order: Literal["start", "energy"] = "start",
    ) -> list[RequestResult]:
        """Requests with start_ns in [since_ns, until_ns) (either end open when None), of ``model`` when given, at
        most ``limit``: newest start first, or (``order="energy"``) most active energy first, those without
        energy last."""

    @abc.abstractmethod
    def request_summary(
        self, by: Literal["model", "tenant", "host"], since_ns: int, until_ns: int
    ) -> list[RequestSummaryRow]:
        """Per group, the final and approximate requests with start_ns in [since_ns, until_ns), largest energy
        first. A request on several hosts counts in each of its hosts' groups. Percentiles interpolate linearly
        between the sorted energies (numpy's default)."""

    @abc.abstractmethod
    def request_hours(self, since_ns: int, until_ns: int) -> list[RequestHourRow]:
        """Per model and UTC hour of start_ns, the final and approximate requests with start_ns in [since_ns,
        until_ns): their count and active J, summed by the database (one row per model and hour, whatever the
        number of requests), ordered by model and hour."""

    # Training steps and workload labels (issue 7), written with their batches.

    @abc.abstractmethod
    def workload_steps(self, since_ns: int, until_ns: int) -> list[WorkloadStepsRow]:
        """Per (host, workload, phase, job): steps in the minutes starting in [since_ns, until_ns)."""

    @abc.abstractmethod
    def workload_labels(self, since_ns: int = 0) -> list[StoredLabelsRow]:
        """Every workload's labels last reported at or after ``since_ns``, by host and workload."""

    @abc.abstractmethod
    def prune(self, now_ns: int, raw_retention_s: float, rollup_retention_s: float) -> int:
        """Delete raw chunks, spans and process bindings older than ``raw_retention_s``, rollups, steps per minute,
        workload labels and requests (with their spans) older than ``rollup_retention_s``; returns the number of rows
        deleted. A request still pending once its samples, or its first ones, are pruned becomes ``no_samples``."""

    @abc.abstractmethod
    def close(self) -> None: ...


def continuous_energy(chunks: Iterable[tuple[str, Int64Array, Float64Array]]) -> tuple[Int64Array, Float64Array]:
    """Join (instance id, time_ns, cumulative energy_j) chunks, in time order, into one counter that never resets.

    When the instance changes, the new one's first sample continues from the previous one's last (the energy
    between the old agent's last sample and the new one's first was not measured, so it counts as none).
    """
    times: list[Int64Array] = []
    energies: list[Float64Array] = []
    offset = 0.0
    previous_instance: str | None = None
    last = 0.0
    for instance_id, time_ns, energy_j in chunks:
        if len(time_ns) == 0:
            continue
        if previous_instance is None:
            offset = 0.0
        elif instance_id != previous_instance:
            offset = last - float(energy_j[0])
        previous_instance = instance_id
        shifted = energy_j + offset
        times.append(time_ns)
        energies.append(shifted)
        last = float(shifted[-1])
    if not times:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    return np.concatenate(times), np.concatenate(energies)


def unmeasured_stretches(
    chunks: Sequence[tuple[int, int, int, int]],
    holes: Mapping[int, Sequence[tuple[int, int]]],
    since_ns: int,
    until_ns: int,
) -> list[tuple[int, int]]:
    """``Store.unmeasured_times`` from one device's chunks ``(instance, sequence, first ns, last ns)`` in time order
    and, per instance with sequences stored above its contiguous watermark, the runs ``(first, last)`` of sequences
    missing below the highest stored: its batches not stored yet. A run's stretch reaches from this device's last
    samples before it to its first after it (a batch may hold none of the device: it ends where they resume)."""
    out: list[tuple[int, int]] = []
    for (ref, _, _, end), (next_ref, _, start, _) in itertools.pairwise(chunks):
        if next_ref != ref and start > end:  # another instance's samples begin: a restart
            out.append((end, start))
    for ref, runs in holes.items():
        own = sorted((seq, t0, t1) for r, seq, t0, t1 in chunks if r == ref)
        sequences = [seq for seq, _, _ in own]
        for first, last in runs:
            at = bisect.bisect_left(sequences, first)  # own[at - 1] before the run, own[after] past it
            after = bisect.bisect_right(sequences, last)
            if after < len(own):
                before = own[after][1]
                if at > 0:
                    begin = own[at - 1][2]
                elif sequences[after] == last + 1:  # the instance's samples before the run are outside the window,
                    # or there are none: from the latest of other instances' before it, else the window's start
                    begin = max((t1 for r, _, _, t1 in chunks if r != ref and t1 < before), default=since_ns)
                else:  # the batches between the run and these samples are outside the window: so is the run
                    continue
            elif at > 0:
                begin, before = own[at - 1][2], until_ns
            else:
                continue
            if before > begin:
                out.append((begin, before))
    return sorted(set(out))


def missing_runs(watermark: int, stored: Sequence[int]) -> list[tuple[int, int]]:
    """The runs ``(first, last)`` of sequences above ``watermark`` and below the highest of ``stored`` (sorted, all
    above it) that are not stored."""
    runs: list[tuple[int, int]] = []
    previous = watermark
    for sequence in stored:
        if sequence > previous + 1:
            runs.append((previous + 1, sequence - 1))
        previous = max(previous, sequence)
    return runs
