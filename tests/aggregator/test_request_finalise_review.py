"""Review of request finalisation (issue 5): watermark and grace, gaps, agent restarts, late and out-of-order
samples and spans, zero-length and overlapping spans, end times past the clock. Energies are hand-computed from
constant (or piecewise constant) power."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from collector.store.base import SpanRow, Store, StoredBatch, WriteResult
from tests.aggregator.test_request_engine import (
    Clock,
    constant_host,
    engine_for,
    result,
    result_after_the_grace,
)
from tests.fakes.request_world import T0, WORKLOAD, HostWriter, S

TENTH = S // 10


class Holding:
    """``store`` as an agent that still holds (has not had acknowledged) its sequences from ``oldest`` on writes to
    it: a batch sent ahead of an earlier one is stored out of order, and the earlier one is stored when it comes."""

    def __init__(self, store: Store, oldest: int = 1) -> None:
        self.store = store
        self.oldest = oldest

    def write_batch(self, batch: StoredBatch) -> WriteResult:
        return self.store.write_batch(dataclasses.replace(batch, oldest_pending_sequence=self.oldest))


def holding_writer(store: Store, hostname: str = "host-a") -> HostWriter:
    return HostWriter(Holding(store), hostname)  # type: ignore[arg-type]  # write_batch is all it uses


def write_samples(
    writer: HostWriter,
    from_s: float,
    to_s: float,
    energy_at: Callable[[np.ndarray], np.ndarray],
    power_at: Callable[[np.ndarray], np.ndarray],
    *,
    device_id: str = "gpu0",
    device_offset_j: float = 1000.0,
    workload_offset_j: float = 0.0,
    workload: tuple[str, str, str] = WORKLOAD,
    with_workload: bool = True,
    batch_s: float = 1.0,
) -> None:
    """Samples at 10 Hz from ``from_s`` to ``to_s`` (seconds after T0, both included), one batch per ``batch_s``;
    the device counter is ``device_offset_j + energy_at(t)``, the workload's ``workload_offset_j + energy_at(t)``
    (the workload has the device to itself)."""
    ticks = np.arange(round(from_s * 10), round(to_s * 10) + 1, dtype=np.int64)
    t = T0 + ticks * TENTH
    seconds = (t - T0) / S
    batch = np.floor(seconds / batch_s + 1e-9).astype(np.int64)
    for b in np.unique(batch):
        at = batch == b
        e = energy_at(seconds[at])
        writer.write(
            device_id,
            "gpu",
            t[at],
            device_offset_j + e,
            power_at(seconds[at]),
            {workload: workload_offset_j + e} if with_workload else {},
        )


def flat(watts: float) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    return (lambda s: watts * s), (lambda s: np.full(s.size, watts))


def span(rid: str, host: str, start_s: float, end_s: float, span_id: str = "s", **fields: object) -> SpanRow:
    fields.setdefault("workload", "vllm")
    return SpanRow(rid, span_id, host, T0 + round(start_s * S), T0 + round(end_s * S), **fields)  # type: ignore[arg-type]


# -- a request on two hosts, one of them without samples past its end


def test_two_hosts_one_stops_before_the_end_pending_then_approximate_with_what_was_measured(store: Store) -> None:
    constant_host(store, "host-a", watts=100.0)  # to 20 s
    constant_host(store, "host-b", watts=300.0, seconds=5)  # samples stop at 5 s
    store.write_spans([span("r", "host-a", 2, 3, "prefill"), span("r", "host-b", 3, 7, "decode")])
    clock = Clock(T0 + 20 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status == "pending"  # host-a is past its end, host-b is not
    clock.now_ns = T0 + 7 * S + 30 * S
    engine.run_pass()
    r = result(store, "r")
    assert r.status == "approximate"
    assert r.active_j == pytest.approx(100 * 1 + 300 * 2, rel=1e-9)  # host-a [2, 3] + host-b [3, 5]
    assert r.hosts == ("host-a", "host-b")


def test_two_hosts_one_never_sends_approximate_with_the_other_s_energy_not_no_samples(store: Store) -> None:
    constant_host(store, "host-a", watts=100.0)
    store.write_spans([span("r", "host-a", 2, 4, "prefill"), span("r", "host-silent", 4, 6, "decode")])
    r = result_after_the_grace(store, T0 + 20 * S, T0 + 6 * S)
    assert (r.status, r.active_j) == ("approximate", pytest.approx(200.0, rel=1e-9))
    assert r.gpu_j == pytest.approx(200.0, rel=1e-9)


# -- gaps in the samples


@pytest.mark.parametrize(("gap_from", "gap_to", "final"), [(4.0, 7.0, False), (4.0, 5.5, True)])
def test_a_gap_over_the_request(store: Store, gap_from: float, gap_to: float, final: bool) -> None:
    """One agent instance, counter continuous; samples missing over (gap_from, gap_to). A gap over 2 s during the
    request: approximate after the grace (the README: final only with no gap over 2 s); 1.5 s: final. With constant
    power, interpolation across the gap gives the whole energy either way."""
    writer = HostWriter(store, "host-a")
    write_samples(writer, 0, gap_from, *flat(100.0))
    write_samples(writer, gap_to, 20, *flat(100.0))
    store.write_spans([span("inside", "host-a", 4.5, 5.0), span("across", "host-a", 3, 8)])
    clock = Clock(T0 + 20 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    if final:
        assert (result(store, "inside").status, result(store, "across").status) == ("final", "final")
    else:
        assert (result(store, "inside").status, result(store, "across").status) == ("pending", "pending")
        clock.now_ns = T0 + 8 * S + 30 * S
        engine.run_pass()
        assert (result(store, "inside").status, result(store, "across").status) == ("approximate", "approximate")
    # [3, 4.5]: across alone 150 J; [4.5, 5]: shared, 25 J each; [5, 8]: across alone 300 J
    assert result(store, "inside").active_j == pytest.approx(25.0, rel=1e-9)
    assert result(store, "across").active_j == pytest.approx(150 + 25 + 300, rel=1e-9)


# -- a span that ends exactly at the last sample


def test_a_span_ending_exactly_at_the_last_sample_is_final(store: Store) -> None:
    constant_host(store, seconds=10)  # the last sample at exactly 10 s
    store.write_spans([span("r", "host-a", 8, 10), span("past", "host-a", 8.5, 10.000000001)])
    clock = Clock(T0 + 11 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    r = result(store, "r")
    assert r.status == "final"
    # [8, 8.5] r alone; [8.5, 10] shared: 50 + 75; past's last ns beyond the samples is unknown: pending
    assert r.active_j == pytest.approx(50 + 75, rel=1e-9)
    assert result(store, "past").status == "pending"


# -- a span whose workload is unknown on a host that does send samples


@pytest.mark.parametrize(
    "fields",
    [{"workload": "not-here"}, {"workload": "", "pid": 999}, {"workload": "", "service_name": "nothing"}],
    ids=["named", "unbound-pid", "service"],
)
def test_an_unknown_workload_on_a_host_with_samples_is_no_samples_after_the_grace(
    store: Store, fields: dict[str, object]
) -> None:
    constant_host(store)
    store.write_spans([span("r", "host-a", 2, 4, **fields), span("known", "host-a", 2, 4)])  # type: ignore[arg-type]
    clock = Clock(T0 + 10 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status == "pending"  # the workload may yet appear (its batch late)
    # the unknown one weighs nothing: the known one gets all of [2, 4]
    assert (result(store, "known").status, result(store, "known").active_j) == ("final", pytest.approx(200.0))
    clock.now_ns = T0 + 4 * S + 30 * S
    engine.run_pass()
    r = result(store, "r")
    assert r.status == "no_samples"
    assert (r.active_j, r.full_j, r.gpu_j) == (None, None, None)


def test_a_host_with_samples_but_no_series_for_the_workload_is_no_samples(store: Store) -> None:
    writer = HostWriter(store, "host-a")
    write_samples(writer, 0, 20, *flat(100.0), workload=("batch-job", "training", "j1"))
    store.write_spans([span("r", "host-a", 2, 4)])  # names vllm
    clock = Clock(T0 + 4 * S + 30 * S)
    engine_for(store, clock, finalize_grace_s=30).run_pass()
    assert (result(store, "r").status, result(store, "r").active_j) == ("no_samples", None)


# -- the agent restarting mid-request


@pytest.mark.parametrize("new_counter_from", [0.0, 50_000.0], ids=["reset-to-0", "jumps-up"])
def test_an_agent_restart_mid_request_neither_negative_nor_double(store: Store, new_counter_from: float) -> None:
    """Instance A to 5.0 s, instance B from 5.1 s with its counters starting anew. The store joins them (the
    0.1 s between the two instances is unmeasured: counted as none), so a request across the restart is a lower
    bound: approximate once its grace is over, never final; one after it is final."""
    old = HostWriter(store, "host-a", instance="agent-1")
    write_samples(old, 0, 5, *flat(100.0))
    new = HostWriter(store, "host-a", instance="agent-2")
    e, p = flat(100.0)
    write_samples(
        new,
        5.1,
        20,
        lambda s: e(s) - 510.0 + new_counter_from,  # counters from new_counter_from at 5.1 s
        p,
        device_offset_j=new_counter_from,
        workload_offset_j=0.0,
    )
    store.write_spans([span("r", "host-a", 2, 8), span("after", "host-a", 6, 7)])
    clock = Clock(T0 + 20 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status == "pending"  # the 0.1 s it did not measure is inside r
    clock.now_ns = T0 + 39 * S
    engine.run_pass()
    r, after = result(store, "r"), result(store, "after")
    assert r.status == "approximate"
    # [2, 5] 300 J, [5, 5.1] unmeasured, [5.1, 6] 90 J, [6, 7] 50 J (shared with after), [7, 8] 100 J
    assert r.active_j == pytest.approx(300 + 90 + 50 + 100, rel=1e-9)
    assert (after.status, after.active_j) == ("final", pytest.approx(50.0, rel=1e-9))


# -- samples arriving out of order


def test_samples_in_two_batches_out_of_order(store: Store) -> None:
    writer = holding_writer(store)
    e, p = flat(100.0)
    # the second batch (10-20 s, sequence 2) is stored first, then the first one (0-9.9 s, sequence 1)
    writer.sequence = 1
    write_samples(writer, 10, 20, e, p, batch_s=20)
    store.write_spans([span("early", "host-a", 2, 4), span("seam", "host-a", 8, 12), span("late", "host-a", 14, 16)])
    clock = Clock(T0 + 21 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert (result(store, "early").status, result(store, "seam").status) == ("pending", "pending")
    assert (result(store, "late").status, result(store, "late").active_j) == ("final", pytest.approx(200.0))
    writer.sequence = 0
    write_samples(writer, 0, 9.9, e, p, batch_s=20)
    clock.now_ns += 10 * S  # past any backoff, within the grace
    engine.run_pass()
    assert (result(store, "early").status, result(store, "early").active_j) == ("final", pytest.approx(200.0))
    assert (result(store, "seam").status, result(store, "seam").active_j) == ("final", pytest.approx(400.0))


def test_a_missing_batch_that_arrives_later_changes_a_request_inside_it(store: Store) -> None:
    """100 W, except 300 W in [5, 6) s. The batch of [5, 6) (sequence 6) comes after the batches that follow it
    (an agent's stream reconnecting, a replay): a request inside that second must not be final from the
    interpolation across the hole, or must be computed again once the batch is there (it is 'out-of-order samples',
    which the issue says are handled; the store knows the instance's contiguous sequence watermark)."""

    def energy(s: np.ndarray) -> np.ndarray:
        return 100.0 * s + 200.0 * np.clip(s - 5.0, 0.0, 1.0)

    def power(s: np.ndarray) -> np.ndarray:
        return np.where((s >= 5.0) & (s < 6.0), 300.0, 100.0)

    writer = holding_writer(store)
    write_samples(writer, 0, 4.9, energy, power)  # sequences 1-5
    writer.sequence = 6
    write_samples(writer, 6.0, 20, energy, power)  # sequences 7-21
    store.write_spans([span("r", "host-a", 5.2, 5.8)])
    clock = Clock(T0 + 21 * S)  # r's grace runs to 35.8 s
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    writer.sequence = 5
    write_samples(writer, 5.0, 5.9, energy, power)  # sequence 6, late
    assert len(store.device_samples("host-a", "gpu0", T0, T0 + 21 * S)) == 201  # all stored
    for _ in range(3):
        clock.now_ns += 9 * S  # past any backoff and the grace
        engine.run_pass()
    r = result(store, "r")
    assert r.active_j == pytest.approx(300 * 0.6, rel=1e-6), r


# -- late spans after the request was settled


def test_a_late_span_with_the_same_span_id_changes_nothing(store: Store) -> None:
    constant_host(store)
    engine = engine_for(store, Clock(T0 + 30 * S))
    store.write_spans([span("r", "host-a", 2, 6, "s1"), span("n", "host-a", 4, 8)])
    engine.run_pass()
    r_before, n_before = result(store, "r"), result(store, "n")
    assert (r_before.active_j, n_before.active_j) == (pytest.approx(300.0), pytest.approx(300.0))
    # the same (request, span) again, even with other times and tokens: stored once, no change
    assert store.write_spans([span("r", "host-a", 2, 6, "s1"), span("r", "host-a", 1, 9, "s1", output_tokens=5)]) == 0
    stats = engine.run_pass()
    assert (stats.written, stats.revised) == (0, 0)
    assert (result(store, "r"), result(store, "n")) == (r_before, n_before)


def test_a_late_span_with_a_new_span_id_recomputes_the_request_and_revises_its_neighbours(store: Store) -> None:
    constant_host(store)
    engine = engine_for(store, Clock(T0 + 30 * S))  # before the spans: all of them in its memory
    store.write_spans([span("r", "host-a", 2, 6, "s1"), span("n", "host-a", 4, 8)])
    engine.run_pass()
    assert result(store, "n").active_j == pytest.approx(300.0)
    assert store.write_spans([span("r", "host-a", 7, 9, "s2")]) == 1
    assert result(store, "r").status == "pending"
    stats = engine.run_pass()
    r, n = result(store, "r"), result(store, "n")
    assert (r.status, n.status) == ("final", "final")
    # r: [2, 4] 200 + [4, 6] 100 + [7, 8] 50 + [8, 9] 100; n: [4, 6] 100 + [6, 7] 100 + [7, 8] 50
    assert r.active_j == pytest.approx(450.0, rel=1e-9)
    assert n.active_j == pytest.approx(250.0, rel=1e-9)
    assert (r.spans, r.start_ns, r.end_ns) == (2, T0 + 2 * S, T0 + 9 * S)
    assert stats.revised == 2  # r written again, n revised


# -- zero duration, overlapping spans of one request


def test_a_request_of_zero_duration(store: Store) -> None:
    constant_host(store)
    store.write_spans([span("zero", "host-a", 5, 5), span("n", "host-a", 4, 6)])
    engine_for(store, Clock(T0 + 30 * S)).run_pass()
    zero, n = result(store, "zero"), result(store, "n")
    assert zero.status == "final"
    assert zero.active_j == pytest.approx(0.0, abs=1e-9)
    assert n.active_j == pytest.approx(200.0, rel=1e-9)


def test_a_zero_duration_request_between_samples_on_a_silent_host_is_no_samples(store: Store) -> None:
    store.write_spans([span("zero", "host-z", 5, 5)])
    clock = Clock(T0 + 5 * S + 30 * S)
    engine_for(store, clock, finalize_grace_s=30).run_pass()
    assert (result(store, "zero").status, result(store, "zero").active_j) == ("no_samples", None)


def test_overlapping_spans_of_one_request_on_one_workload_are_not_counted_twice(store: Store) -> None:
    constant_host(store)
    store.write_spans([span("r", "host-a", 2, 6, "s1"), span("r", "host-a", 4, 8, "s2")])
    engine_for(store, Clock(T0 + 30 * S)).run_pass()
    r = result(store, "r")
    assert r.status == "final"
    assert r.active_j == pytest.approx(600.0, rel=1e-9)  # [2, 8] of 100 W, not 800 J
    assert r.spans == 2


def test_overlapping_spans_of_one_request_with_a_neighbour_conserve_energy(store: Store) -> None:
    constant_host(store)
    store.write_spans([span("r", "host-a", 2, 6, "s1"), span("r", "host-a", 4, 8, "s2"), span("n", "host-a", 4, 8)])
    engine_for(store, Clock(T0 + 30 * S)).run_pass()
    r, n = result(store, "r"), result(store, "n")
    assert r.active_j is not None and n.active_j is not None
    assert r.active_j + n.active_j == pytest.approx(600.0, rel=1e-9)


# -- end_ns slightly in the future of the aggregator's clock


def test_an_end_slightly_in_the_future(store: Store) -> None:
    """The aggregator's clock reads 10 s; the span (its host's clock ahead) ends at 10.2 s. Samples to 10 s only:
    pending; once samples past 10.2 s arrive it is final (not held back by the backoff past its deadline)."""
    writer = HostWriter(store, "host-a")
    e, p = flat(100.0)
    write_samples(writer, 0, 10, e, p)
    store.write_spans([span("r", "host-a", 8, 10.2)])
    clock = Clock(T0 + 10 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status == "pending"
    write_samples(writer, 10.1, 13, e, p)
    clock.now_ns = T0 + 13 * S + S // 2
    for _ in range(4):
        engine.run_pass()
        clock.now_ns += S
    r = result(store, "r")
    assert (r.status, r.active_j) == ("final", pytest.approx(220.0, rel=1e-9))


def test_an_end_in_the_future_with_samples_past_it_is_final_before_the_clock_reaches_it(store: Store) -> None:
    constant_host(store)  # to 20 s (the host's clock ahead)
    store.write_spans([span("r", "host-a", 8, 12)])
    engine_for(store, Clock(T0 + 11 * S), finalize_grace_s=30).run_pass()
    assert (result(store, "r").status, result(store, "r").active_j) == ("final", pytest.approx(400.0))


def test_a_device_lost_mid_request(store: Store) -> None:
    """The workload on gpu0 and gpu1 (100 W each); gpu1 stops at 5 s: pending, then approximate (a lower bound)."""
    writer0 = HostWriter(store, "host-a", instance="a-0")
    writer1 = HostWriter(store, "host-a", instance="a-1")
    write_samples(writer0, 0, 20, *flat(100.0), device_id="gpu0")
    write_samples(writer1, 0, 5, *flat(100.0), device_id="gpu1")
    store.write_spans([span("r", "host-a", 2, 8)])
    clock = Clock(T0 + 20 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status == "pending"
    clock.now_ns = T0 + 38 * S
    engine.run_pass()
    r = result(store, "r")
    assert (r.status, r.active_j) == ("approximate", pytest.approx(600 + 300, rel=1e-9))


def test_a_workload_appearing_mid_request(store: Store) -> None:
    """The device from 0 s, the workload's series only from 5 s (its energy from 0 there): [2, 5] it had none."""
    writer = HostWriter(store, "host-a")
    e, p = flat(100.0)
    write_samples(writer, 0, 4.9, e, p, with_workload=False)
    write_samples(writer, 5, 20, e, p, workload_offset_j=-500.0)
    store.write_spans([span("r", "host-a", 2, 8)])
    engine_for(store, Clock(T0 + 20 * S)).run_pass()
    r = result(store, "r")
    assert (r.status, r.active_j) == ("final", pytest.approx(300.0, rel=1e-9))


def test_a_late_span_with_a_new_span_id_after_a_restart_settles_within_two_passes(store: Store) -> None:
    """As above, but the engine began after r's first span was stored (a restart): its memory has only the late
    span, so the first pass finds r partial and the next one reads r's spans from the store."""
    constant_host(store)
    store.write_spans([span("r", "host-a", 2, 6, "s1"), span("n", "host-a", 4, 8)])
    engine = engine_for(store, Clock(T0 + 30 * S))
    engine.run_pass()
    store.write_spans([span("r", "host-a", 7, 9, "s2")])
    engine.run_pass()
    engine.run_pass()
    r, n = result(store, "r"), result(store, "n")
    assert (r.status, r.active_j, r.spans) == ("final", pytest.approx(450.0, rel=1e-9), 2)
    assert (n.status, n.active_j) == ("final", pytest.approx(250.0, rel=1e-9))


def test_a_restart_whose_old_instance_s_last_batch_comes_after_the_new_one_s(store: Store) -> None:
    """Instance A's samples to 3.9 s are stored, then B's from 5.1 s (counters anew), then A's last batch [4, 5]
    (its spool replayed late, within the grace). The join A(3.9 s) -> B(5.1 s) is a 1.2 s break, no gap: a request
    inside it, at 100 W, must not come out final with 0 J, nor stay so once A's batch is there."""
    old = HostWriter(Holding(store), "host-a", instance="agent-1")  # type: ignore[arg-type]
    e, p = flat(100.0)
    write_samples(old, 0, 3.9, e, p)  # sequences 1-4
    new = HostWriter(store, "host-a", instance="agent-2")
    write_samples(new, 5.1, 20, lambda s: e(s) - 510.0, p, device_offset_j=0.0)
    store.write_spans([span("r", "host-a", 4.2, 4.8)])
    clock = Clock(T0 + 21 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    write_samples(old, 4.0, 5.0, e, p)  # sequences 5 and 6, late
    for _ in range(3):
        clock.now_ns += 9 * S
        engine.run_pass()
    r = result(store, "r")
    assert r.active_j == pytest.approx(60.0, rel=1e-9), r


def test_a_request_inside_an_agent_restart_s_break_is_not_final_with_0_joules(store: Store) -> None:
    """Instance A to 3.9 s, B from 5.1 s, in order, nothing late. The store joins them with the 1.2 s between
    unmeasured (none), and 1.2 s is under the 2 s gap: a request inside the break, at 100 W, comes out final with
    0 J. Unmeasured energy makes a lower bound (approximate), not a final 0 J."""
    old = HostWriter(store, "host-a", instance="agent-1")
    e, p = flat(100.0)
    write_samples(old, 0, 3.9, e, p)
    new = HostWriter(store, "host-a", instance="agent-2")
    write_samples(new, 5.1, 20, lambda s: e(s) - 510.0, p, device_offset_j=0.0)
    store.write_spans([span("r", "host-a", 4.2, 4.8)])
    clock = Clock(T0 + 35 * S)
    engine_for(store, clock, finalize_grace_s=30).run_pass()
    r = result(store, "r")
    assert not (r.status == "final" and r.active_j == 0.0), r


def test_the_store_names_the_stretches_it_joins_unmeasured(store: Store) -> None:
    """A restart (A to 3.9 s, B from 5.1 s) and a batch of B not stored yet ([8, 9) s): two stretches; none once
    the batch is there, and none in a window that holds neither."""
    e, p = flat(100.0)
    write_samples(HostWriter(store, "host-a", instance="agent-1"), 0, 3.9, e, p)
    new = holding_writer(store)
    new.instance = "agent-2"
    write_samples(new, 5.1, 7.9, e, p)  # sequences 1-3
    new.sequence = 4
    write_samples(new, 9.0, 12.0, e, p)  # sequences 5-8; 4 ([8, 9) s) missing
    assert store.unmeasured_times("host-a", "gpu0", T0, T0 + 13 * S) == [
        (T0 + 39 * TENTH, T0 + 51 * TENTH),
        (T0 + 79 * TENTH, T0 + 90 * TENTH),
    ]
    assert store.unmeasured_times("host-a", "gpu0", T0 + 10 * S, T0 + 12 * S) == []
    # windows with one side of the hole: it runs from the window's start, or to its end
    assert store.unmeasured_times("host-a", "gpu0", T0 + 85 * TENTH, T0 + 12 * S) == [(T0 + 85 * TENTH, T0 + 9 * S)]
    assert store.unmeasured_times("host-a", "gpu0", T0 + 6 * S, T0 + 8 * S) == [(T0 + 79 * TENTH, T0 + 8 * S)]
    new.sequence = 3
    write_samples(new, 8.0, 8.9, e, p)  # sequence 4
    assert store.unmeasured_times("host-a", "gpu0", T0, T0 + 13 * S) == [(T0 + 39 * TENTH, T0 + 51 * TENTH)]
    assert store.unmeasured_times("nowhere", "gpu0", T0, T0 + 13 * S) == []


def test_a_hole_long_before_the_window_names_nothing_in_it(store: Store) -> None:
    """Batch 3 ([2, 3) s) missing, 4-21 stored: a window of [15, 18] s holds none of it."""
    e, p = flat(100.0)
    writer = holding_writer(store)
    write_samples(writer, 0, 1.9, e, p)  # sequences 1-2
    writer.sequence = 3
    write_samples(writer, 3.0, 20, e, p)  # sequences 4-21
    assert store.unmeasured_times("host-a", "gpu0", T0, T0 + 21 * S) == [(T0 + 19 * TENTH, T0 + 3 * S)]
    assert store.unmeasured_times("host-a", "gpu0", T0 + 15 * S, T0 + 18 * S) == []
