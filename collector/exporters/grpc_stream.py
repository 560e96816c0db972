"""The agent's side of the telemetry stream: batches of readings, spooled on disk, sent over gRPC until acked.

Three threads besides the sampler's. The flusher takes the ``BatchBuilder``'s buffers every ``batch_interval_s``
(sooner when one reaches ``max_batch_bytes``), makes each a ``Batch`` with the next sequence number and appends it to
the spool before anything is sent. The sender holds one bidirectional ``Stream`` call to the aggregator: gRPC's own
request thread pulls records from the spool (everything pending at connect, then new ones), an ack reader releases
the spool as acks come, and the sender itself watches for a stall (``ack_timeout_s``) and reconnects with backoff.

What is sent is the spooled bytes as they are: a batch replayed after a restart keeps its instance id and sequence,
so the aggregator's (instance, sequence) deduplication makes a replay store nothing twice.

Training steps (``steps``: cumulative per workload) and the workloads' registration labels ride in the batches too,
when they changed and every few minutes again (``batching.StepChanges``, ``LabelChanges``).

Request spans (``add_span``, from the registration socket) ride in the same batches: each batch takes the waiting
spans that fit in what its series and bindings leave of ``max_batch_bytes``, and batches of spans alone carry the rest
in the same flush. Once spooled they have the batches' guarantees.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from collector.config import StreamConfig, is_loopback, parse_target
from collector.errors import ConfigError
from collector.exporters.batching import (
    BATCH_RESERVE_BYTES,
    SPAN_FRAMING_BYTES,
    BatchBuilder,
    BindingChanges,
    LabelChanges,
    SeriesBuffer,
    SpanQueue,
    StepChanges,
    span_message,
)
from collector.exporters.exposition import Family
from collector.exporters.stream_channel import STREAM_METHOD, ChannelSettings, backoff_s
from collector.hostid import read_host_id
from collector.proto import wattmeter_pb2 as pb
from collector.registration import SpanEvent
from collector.sampler import Sampler
from collector.spool import Spool, SpoolError
from collector.workloads.steps import WorkloadSteps
from collector.workloads.tracker import WorkloadTracker

log = logging.getLogger(__name__)

PROTOCOL_MAJOR = 1
SEGMENT_BYTES = 8 * 1024 * 1024
MAX_INFLIGHT_BATCHES = 64  # sent, not yet acked: bounds what one reconnect sends again
READ_BATCH_RECORDS = 16
# Waits are woken by appends, acks and stop; the timeouts are a safety net, long so an idle agent rarely wakes.
WAKE_S = 1.0
JOIN_S = 0.2
LOG_EVERY_S = 60.0
STOP_TIMEOUT_S = 0.5
FINAL_FLUSH_S = 0.15  # of the stop budget: one append (and its fsync) and the spool's close
POISON_STRIKES = 3
# The agent cannot fix these by sending again soon: wrong credentials, a server too old or new, a wrong port.
UNFIXABLE = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# A stream refused as a whole for what it carried: if the same first batch keeps causing it, that batch goes.
POISONED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})


class _Every:
    """Lets one kind of log line through at most once per ``interval_s``."""

    def __init__(self, interval_s: float = LOG_EVERY_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def due(self, kind: str) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        return True

    def take_suppressed(self, kind: str) -> int:
        return self.suppressed.pop(kind, 0)


@dataclass(frozen=True)
class _Sent:
    record_no: int
    instance_id: str  # "": a record that could not be read as a batch, done once those before it are
    sequence: int
    ordinal: int  # 1, 2, 3... in the order sent on its stream: the aggregator answers each batch with one ack


class _Connection:
    """One ``Stream`` call and what was sent on it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.call: grpc.RpcContext | None = None
        self.inflight: deque[_Sent] = deque()
        self.sent = 0
        self.waiting_since: float | None = None  # monotonic: the oldest unanswered send, or the last ack since
        self.done = threading.Event()
        self.acks = 0
        self.timed_out = False
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()


@dataclass(frozen=True)
class StreamStats:
    connected: bool
    spool_bytes: int
    sent_batches: int
    acked_batches: int
    dropped_batches: int
    rejected_batches: int
    lag_s: float
    spans_forwarded: int = 0
    """Request spans spooled in a batch."""
    spans_dropped: int = 0
    """Request spans lost before the spool: the pending cap was reached, or their batch could not be spooled."""
    spans_pending: int = 0


def open_spool(config: StreamConfig) -> Spool:
    try:
        return Spool(
            config.spool_dir,
            max_bytes=config.spool_max_bytes,
            segment_bytes=min(SEGMENT_BYTES, config.spool_max_bytes // 8),
            fsync=config.fsync,
        )
    except SpoolError as exc:
        raise ConfigError(f"[stream] spool_dir: {exc}") from None


def _as_bytes(payload: bytes) -> bytes:
    return payload


class StreamExporter:
    """Streams this agent's readings to ``[stream] target``; ``start`` and ``stop`` with the agent."""

    def __init__(
        self,
        config: StreamConfig,
        sampler: Sampler,
        tracker: WorkloadTracker | None = None,
        *,
        steps: WorkloadSteps | None = None,
        host_root: Path = Path("/"),
        bindings_interval_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        """``host_root`` moves /etc/machine-id and /proc/sys/kernel/random/boot_id (tests); process bindings are
        looked up at most every ``bindings_interval_s`` (the workload scan interval), and so are the workloads'
        registration labels; ``steps``' counts at every flush."""
        self.config = config
        self.settings = ChannelSettings.from_config(config)
        host = parse_target(config.target)[0]
        if config.token_file is not None and not self.settings.tls and not is_loopback(host):
            log.warning("[stream] token_file: the token goes to %s in plain text (insecure = true)", host)
        self.spool = open_spool(config)
        identity = read_host_id(config.hostname, host_root)
        self.host = pb.HostIdentity(
            hostname=identity.hostname, machine_id=identity.machine_id, boot_id=identity.boot_id
        )
        self.instance_id = str(uuid.uuid4())
        self.sampler = sampler
        self.tracker = tracker
        self.builder = BatchBuilder(sampler, config.max_batch_bytes)
        sampler.add_listener(self.builder.on_readings)
        if tracker is not None:
            tracker.add_split_listener(self.builder.on_split)
        self.bindings = BindingChanges()
        self.steps = steps
        self.step_changes = StepChanges()
        self.label_changes = LabelChanges()
        self.spans = SpanQueue(self.builder.cut, self.builder.cut_bytes)
        self._spans_spooled = 0
        self._spans_lost = 0  # in a batch the spool could not take
        self.bindings_interval_s = bindings_interval_s
        self._bindings_checked: float | None = None
        self._rng = rng or random.Random()
        self._sequence = 0
        self._sent = 0
        self._acked = 0
        self._rejected = 0
        self._dropped = 0  # disk full and unreadable records; the spool counts what its cap dropped
        # record_no -> (instance, sequence, created_ns): this instance's records, and earlier ones once read
        self._meta: dict[int, tuple[str, int, int]] = {}
        self._own_pending: deque[tuple[int, int]] = deque()  # (record_no, sequence) of this instance, unacked
        self._appended = 0  # bumped at every append, so a waiting sender never misses one
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # records appended, acks in, stopping
        self._read_lock = threading.Lock()  # the spool's reading side (reads and releases) is one thread at a time
        self._flush_lock = threading.Lock()
        self._connection: _Connection | None = None
        self._strikes: tuple[int, int] = (0, 0)  # (first record, failed streams in a row with it first)
        self._logs = _Every()
        self._stopped = threading.Event()
        self._closed = False
        self._threads: list[threading.Thread] = []

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("stream-flush", self._flush_loop), ("stream-send", self._send_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        log.info(
            "streaming to %s (%s), spool %s, instance %s",
            self.config.target,
            "TLS" if self.settings.tls else "plain text",
            self.config.spool_dir,
            self.instance_id,
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Spool what the last interval gathered and close within ``timeout_s``; what is unsent stays spooled."""
        deadline = time.monotonic() + timeout_s
        self._stopped.set()
        self.builder.cut.set()
        with self._changed:
            connection = self._connection
            self._changed.notify_all()
        if connection is not None:
            connection.cancel()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic() - FINAL_FLUSH_S))
        if not self._flush_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("stream: stopped without spooling the last interval (the spool is slow)")
            return
        try:
            self._flush_locked()
            with self._read_lock, self._lock:
                self._closed = True
                self.spool.close()
        finally:
            self._flush_lock.release()

    # --- batches --------------------------------------------------------------------------------------------------

    def _flush_loop(self) -> None:
        interval_s = self.config.batch_interval_s
        deadline = time.monotonic() + interval_s
        while True:
            cut = self.builder.cut.wait(max(0.0, deadline - time.monotonic()))
            if self._stopped.is_set():
                return
            now = time.monotonic()
            if not cut or now >= deadline:  # a late tick skips the deadlines it missed, like the sampler's
                deadline += ((now - deadline) // interval_s + 1) * interval_s
            try:
                self.flush()
            except Exception:  # a bug here must not end the loop: the next interval tries again
                log.exception("stream: building a batch failed")

    def flush(self) -> int:
        """Make batches of everything gathered since the last flush and spool them; returns how many."""
        with self._flush_lock:
            return self._flush_locked()

    def add_span(self, event: SpanEvent) -> bool:
        """Queue a request span for the next batch; False when ``MAX_PENDING_SPANS`` already wait (dropped, counted).
        Called on the registration thread."""
        return self.spans.add(span_message(event))

    def _flush_locked(self) -> int:
        if self._closed:
            return 0
        buffers = self.builder.take()
        self._update_bindings()
        self._update_steps()
        # The spans waiting now, and no more: spans arriving faster than the spool takes them must not keep this
        # flush going. Later ones go with the next flush.
        spans_left = self.spans.pending
        facts = self.bindings.pending or self.step_changes.pending or self.label_changes.pending
        if not buffers and (facts or spans_left):
            buffers = [SeriesBuffer()]
        spooled = 0
        for buffer in buffers:
            devices, workloads = buffer.to_proto()
            budget = self.config.max_batch_bytes - buffer.estimated_bytes - BATCH_RESERVE_BYTES // 2
            processes = self.bindings.take(budget)
            budget -= sum(binding.ByteSize() + SPAN_FRAMING_BYTES for binding in processes)
            steps = self.step_changes.take(budget)
            budget -= sum(series.ByteSize() + SPAN_FRAMING_BYTES for series in steps)
            labels = self.label_changes.take(budget)
            budget -= sum(one.ByteSize() + SPAN_FRAMING_BYTES for one in labels)
            spans, _ = self.spans.take(budget, spans_left)
            spans_left -= len(spans)
            if devices or workloads or processes or spans or steps or labels:
                spooled += self._spool_batch(devices, workloads, processes, spans, steps, labels)
        while spans_left > 0:  # what did not fit beside the series: batches of spans alone
            spans, _ = self.spans.take(self.config.max_batch_bytes - BATCH_RESERVE_BYTES // 2, spans_left)
            if not spans:
                break
            spans_left -= len(spans)
            spooled += self._spool_batch([], [], [], spans)
        return spooled

    def _update_bindings(self) -> None:
        if self.tracker is None:
            return
        now = time.monotonic()
        if self._bindings_checked is not None and now - self._bindings_checked < self.bindings_interval_s:
            return
        self._bindings_checked = now
        try:
            self.bindings.update(self.tracker.process_bindings())
        except Exception:
            log.exception("stream: reading process bindings failed")
        try:
            identities = dict(self.tracker.identities)  # one C-level copy: the scan thread adds and removes keys
            self.label_changes.update({key: identity.labels for key, identity in identities.items()}, now)
        except Exception:
            log.exception("stream: reading workload labels failed")

    def _update_steps(self) -> None:
        if self.steps is None:
            return
        try:
            self.step_changes.update(self.steps.totals(), time.time_ns(), time.monotonic())
        except Exception:
            log.exception("stream: reading training steps failed")

    def _spool_batch(
        self,
        devices: list[pb.DeviceSeries],
        workloads: list[pb.WorkloadSeries],
        processes: list[pb.ProcessBinding],
        spans: list[pb.RequestSpan] | None = None,
        steps: list[pb.StepSeries] | None = None,
        labels: list[pb.WorkloadLabels] | None = None,
    ) -> int:
        sequence = self._sequence + 1
        created_ns = time.time_ns()
        first_pending = self.spool.first_pending
        with self._lock:
            pending = self._own_pending
            while pending and (first_pending is None or pending[0][0] < first_pending):
                # acked, or dropped for the spool's cap: the aggregator must not wait for it
                self._meta.pop(pending.popleft()[0], None)
            oldest = pending[0][1] if pending else sequence
        batch = pb.Batch(
            protocol_major=PROTOCOL_MAJOR,
            host=self.host,
            agent_instance_id=self.instance_id,
            sequence=sequence,
            created_ns=created_ns,
            oldest_pending_sequence=oldest,
            devices=devices,
            workloads=workloads,
            processes=processes,
            spans=spans or (),
            steps=steps or (),
            labels=labels or (),
        )
        try:
            record_no = self.spool.append(batch.SerializeToString())
        except (SpoolError, OSError) as exc:
            # the sequence is not used up: a gap would hold the aggregator's contiguous ack back for good
            with self._lock:
                self._dropped += 1
                self._spans_lost += len(spans or ())
            if self._logs.due("append"):
                log.error("stream: batch dropped: %s", exc)
            return 0
        self._sequence = sequence
        with self._changed:
            self._spans_spooled += len(spans or ())
            self._meta[record_no] = (self.instance_id, sequence, created_ns)
            self._own_pending.append((record_no, sequence))
            self._appended += 1
            self._changed.notify_all()
        return 1

    # --- sending --------------------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        attempt = 0
        while not self._stopped.is_set():
            try:
                connection = self._run_connection()
                delay_s, attempt = self._after(connection, attempt)
            except Exception:
                log.exception("stream: unexpected error; reconnecting")
                delay_s, attempt = self.config.reconnect_max_s, attempt + 1
            self._stopped.wait(delay_s)

    def _run_connection(self) -> _Connection | None:
        try:
            metadata = self.settings.metadata()
        except ConfigError as exc:  # the token file went away since start: keep spooling, try again later
            if self._logs.due("token"):
                log.error("stream: %s", exc)
            return None
        channel = self.settings.channel()
        connection = _Connection(channel)
        stream = channel.stream_stream(
            STREAM_METHOD, request_serializer=_as_bytes, response_deserializer=pb.Ack.FromString
        )
        with self._lock:
            if self._stopped.is_set():
                channel.close()
                return None
            self._connection = connection
        try:
            call = stream(self._requests(connection), metadata=metadata, compression=self.settings.compression)
            connection.call = call
            reader = threading.Thread(target=self._read_acks, args=(connection, call), name="stream-acks", daemon=True)
            reader.start()
            watch_s = min(WAKE_S, self.config.ack_timeout_s / 4)
            while not connection.done.wait(watch_s):
                if self._stopped.is_set():
                    break
                if self._ack_overdue(connection):
                    connection.timed_out = True
                    break
            call.cancel()
            reader.join(JOIN_S)
        finally:
            connection.done.set()  # ends the request iterator
            with self._changed:
                if self._connection is connection:
                    self._connection = None
                self._changed.notify_all()
            channel.close()
        return connection

    def _ack_overdue(self, connection: _Connection) -> bool:
        with self._lock:
            since = connection.waiting_since
        return since is not None and time.monotonic() - since > self.config.ack_timeout_s

    def _requests(self, connection: _Connection) -> Iterator[bytes]:
        """The records to send, oldest first: gRPC pulls them on its own thread as the stream has room."""
        cursor = 0
        while not connection.done.is_set():
            with self._changed:
                appended = self._appended
                if len(connection.inflight) >= MAX_INFLIGHT_BATCHES:
                    self._changed.wait(WAKE_S)
                    continue
            records = self._read_records(cursor)
            if not records:
                with self._changed:
                    if self._appended == appended and not connection.done.is_set():
                        self._changed.wait(WAKE_S)
                continue
            for record_no, payload in records:
                cursor = record_no + 1
                instance_id, sequence = self._describe(record_no, payload)
                with self._lock:
                    if connection.waiting_since is None:
                        connection.waiting_since = time.monotonic()
                    if instance_id:
                        connection.sent += 1
                        self._sent += 1
                    connection.inflight.append(_Sent(record_no, instance_id, sequence, connection.sent))
                if not instance_id:
                    self._settle(connection)
                    continue
                yield payload

    def _read_records(self, cursor: int) -> list[tuple[int, bytes]]:
        with self._read_lock:
            if self._closed:
                return []
            try:
                return list(self.spool.read_from(cursor, max_records=READ_BATCH_RECORDS))
            except SpoolError as exc:
                if self._logs.due("read"):
                    log.error("stream: %s", exc)
                return []

    def _describe(self, record_no: int, payload: bytes) -> tuple[str, int]:
        """(instance, sequence) of a spooled record; ("", 0) for one that is not a batch (counted once)."""
        with self._lock:
            meta = self._meta.get(record_no)
        if meta is None:  # spooled by an earlier agent process: its own instance and sequence are in the bytes
            try:
                batch = pb.Batch.FromString(payload)
            except DecodeError:
                batch = pb.Batch()
            meta = (batch.agent_instance_id, batch.sequence, batch.created_ns)
            if not batch.agent_instance_id or not batch.sequence:
                log.error("stream: spooled record %d is not a batch (%d bytes); dropped", record_no, len(payload))
                meta = ("", 0, time.time_ns())
            with self._lock:
                if not meta[0]:
                    self._dropped += 1
                self._meta[record_no] = meta
        return meta[0], meta[1]

    def _read_acks(self, connection: _Connection, call: Iterator[pb.Ack]) -> None:
        try:
            for ack in call:
                self._settle(connection, ack)
        except grpc.RpcError as exc:
            connection.code = exc.code()
            connection.details = exc.details() or ""
        except Exception as exc:
            log.exception("stream: reading acks failed")
            connection.code, connection.details = grpc.StatusCode.UNKNOWN, str(exc)
        else:
            connection.code, connection.details = grpc.StatusCode.OK, "the aggregator closed the stream"
        finally:
            connection.done.set()

    def _settle(self, connection: _Connection, ack: pb.Ack | None = None) -> None:
        """Pop what ``ack`` answers off the front (and unreadable records in between), and release the spool.

        An ack answers the batch it follows (the aggregator answers each batch once, in order) and covers every
        batch of its instance up to ``acked_sequence``. Both count: a batch replayed from before a gap that the
        spool's cap made is stored, yet stays above the watermark (its ``oldest_pending_sequence`` predates the
        gap), and only its own answer says so.
        """
        if ack is not None and ack.rejected_sequence:
            self._log_rejected(ack)
        with self._read_lock:
            with self._lock:
                released = None
                inflight = connection.inflight
                answer = 0
                if ack is not None:
                    connection.acks += 1
                    answer = connection.acks
                while inflight:
                    head = inflight[0]
                    if head.instance_id:
                        if ack is None or head.instance_id != ack.agent_instance_id:
                            break
                        answered = head.ordinal == answer
                        if answered and head.sequence == ack.rejected_sequence:
                            self._rejected += 1
                        elif answered or head.sequence <= ack.acked_sequence:
                            self._acked += 1
                        else:
                            break
                    inflight.popleft()
                    self._meta.pop(head.record_no, None)
                    released = head.record_no
                if ack is not None:
                    connection.waiting_since = time.monotonic() if inflight else None
                elif not inflight:
                    connection.waiting_since = None
                self._changed.notify_all()
            if released is not None and not self._closed:
                self.spool.release_through(released)

    def _log_rejected(self, ack: pb.Ack) -> None:
        if self._logs.due("rejected"):
            more = self._logs.take_suppressed("rejected")
            log.error(
                "stream: the aggregator refused batch %d of instance %s and will never store it: %s%s",
                ack.rejected_sequence,
                ack.agent_instance_id,
                ack.error or "no reason given",
                f" ({more} more refused since the last report)" if more else "",
            )

    def _after(self, connection: _Connection | None, attempt: int) -> tuple[float, int]:
        """How long to wait before the next connection, and the next attempt number."""
        config = self.config
        if self._stopped.is_set():
            return 0.0, attempt
        if connection is None:
            return config.reconnect_max_s, attempt
        code, details = connection.code, connection.details
        if connection.acks:
            attempt = 0  # it worked for a while: start the backoff over
        if connection.timed_out:
            if self._logs.due("timeout"):
                log.warning(
                    "stream: no ack from %s for %g s with batches outstanding; reconnecting",
                    config.target,
                    config.ack_timeout_s,
                )
        elif code in UNFIXABLE:
            if self._logs.due("unfixable"):
                log.error(
                    "stream: %s refused the stream: %s: %s; batches keep spooling, retrying every %g s",
                    config.target,
                    code.name if code else "?",
                    details,
                    config.reconnect_max_s,
                )
            return config.reconnect_max_s, attempt
        elif code in POISONED:
            self._strike(connection, code, details)
        elif code is not None and code is not grpc.StatusCode.OK and self._logs.due("down"):
            log.warning(
                "stream: %s: %s: %s; batches keep spooling, reconnecting with backoff",
                config.target,
                code.name,
                details,
            )
        return backoff_s(attempt, config.reconnect_min_s, config.reconnect_max_s, self._rng), attempt + 1

    def _strike(self, connection: _Connection, code: grpc.StatusCode, details: str) -> None:
        """The stream failed for what it carried before any ack: after a few times with the same first batch, that
        batch is dropped as rejected, so that one bad batch never blocks all the others."""
        with self._lock:
            head = connection.inflight[0].record_no if connection.inflight else None
        if head is None:
            return
        record, strikes = self._strikes
        strikes = strikes + 1 if record == head else 1
        self._strikes = (head, strikes)
        log.warning("stream: %s: %s: %s (record %d, %d times)", self.config.target, code.name, details, head, strikes)
        if strikes < POISON_STRIKES:
            return
        log.error("stream: record %d was refused %d times: dropped as rejected", head, strikes)
        with self._read_lock:
            with self._lock:
                self._rejected += 1
            if not self._closed and head < self.spool.next_record_no:
                self.spool.release_through(head)

    # --- metrics ----------------------------------------------------------------------------------------------------

    def lag_s(self) -> float:
        """Seconds since the oldest unacknowledged batch was made; 0 when everything is acked."""
        first = self.spool.first_pending
        if first is None:
            return 0.0
        with self._lock:
            meta = self._meta.get(first)
        if meta is None:  # spooled by an earlier agent process and not read yet
            records = self._read_records(first)
            if records:
                self._describe(*records[0])
                with self._lock:
                    meta = self._meta.get(records[0][0])
        if meta is None:
            return 0.0
        return max(0.0, (time.time_ns() - meta[2]) / 1e9)

    def stats(self) -> StreamStats:
        connection = self._connection
        with self._lock:
            sent, acked, rejected, dropped = self._sent, self._acked, self._rejected, self._dropped
            spans_spooled, spans_lost = self._spans_spooled, self._spans_lost
        return StreamStats(
            # the aggregator's first ack is what proves the stream works (TLS, token, protocol), not the TCP connect
            connected=connection is not None and connection.acks > 0 and not connection.done.is_set(),
            spool_bytes=self.spool.bytes,
            sent_batches=sent,
            acked_batches=acked,
            dropped_batches=dropped + self.spool.dropped_records + self.spool.corrupt_records,
            rejected_batches=rejected,
            lag_s=self.lag_s(),
            spans_forwarded=spans_spooled,
            spans_dropped=spans_lost + self.spans.dropped,
            spans_pending=self.spans.pending,
        )


def stream_families(stream: StreamExporter) -> list[Family]:
    """The stream's health for ``/metrics``; read at each render, and every sampler read renders again."""
    stats = stream.stats()
    rows = (
        (
            "wattmeter_stream_connected",
            "gauge",
            "1 while the stream to the aggregator is open and acknowledging batches.",
            stats.connected,
        ),
        (
            "wattmeter_stream_spool_bytes",
            "gauge",
            "Bytes of the on-disk spool of unacknowledged batches.",
            stats.spool_bytes,
        ),
        (
            "wattmeter_stream_sent_batches",
            "counter",
            "Batches sent to the aggregator (a resend counts again).",
            stats.sent_batches,
        ),
        (
            "wattmeter_stream_acked_batches",
            "counter",
            "Batches the aggregator acknowledged as stored.",
            stats.acked_batches,
        ),
        (
            "wattmeter_stream_dropped_batches",
            "counter",
            "Batches lost before the aggregator had them: spool cap reached, disk full, or damaged on disk.",
            stats.dropped_batches,
        ),
        (
            "wattmeter_stream_rejected_batches",
            "counter",
            "Batches the aggregator refused as invalid (dropped from the spool; see the agent's log).",
            stats.rejected_batches,
        ),
        (
            "wattmeter_stream_lag_seconds",
            "gauge",
            "Age of the oldest unacknowledged batch (s); 0 when all are acknowledged.",
            stats.lag_s,
        ),
    )
    families = []
    for name, kind, doc, value in rows:
        family = Family(name, kind, doc, ())
        family.add((), float(value))
        families.append(family)
    return families
