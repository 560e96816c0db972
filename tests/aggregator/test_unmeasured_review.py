"""Review of c2d8ee0 (``Store.unmeasured_times``, ``Device.unmeasured``): stretches a device's stored samples join
unmeasured (agent restarts, batches not stored yet), found too few or too many."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from collector.store.base import HostInfo, Store, StoredBatch
from tests.aggregator.test_request_engine import Clock, engine_for, result
from tests.aggregator.test_request_finalise_review import (
    TENTH,
    Holding,
    flat,
    holding_writer,
    span,
    write_samples,
)
from tests.fakes.request_world import T0, HostWriter, S

EnergyAt = Callable[[np.ndarray], np.ndarray]


def _bump(start_s: float, end_s: float, extra_w: float = 200.0):  # type: ignore[no-untyped-def]
    """100 W, plus ``extra_w`` in [start_s, end_s)."""

    def energy(s: np.ndarray) -> np.ndarray:
        return 100.0 * s + extra_w * np.clip(s - start_s, 0.0, end_s - start_s)

    def power(s: np.ndarray) -> np.ndarray:
        return np.where((s >= start_s) & (s < end_s), 100.0 + extra_w, 100.0)

    return energy, power


# -- a second hole of one instance


def _two_holes(store: Store, e: EnergyAt, p: EnergyAt) -> HostWriter:
    """Samples of host-a's gpu0 in sequences 1-5 ([0, 5) s), 7 ([6, 7) s) and 9-21 ([8, 21) s): 6 and 8 not yet."""
    writer = holding_writer(store)
    write_samples(writer, 0, 4.9, e, p)  # 1-5
    writer.sequence = 6
    write_samples(writer, 6.0, 6.9, e, p)  # 7
    writer.sequence = 8
    write_samples(writer, 8.0, 20, e, p)  # 9-21
    return writer


def test_a_second_hole_of_one_instance_is_named(store: Store) -> None:
    """Sequences 1-5 ([0, 5) s), 7 ([6, 7) s), 9-21 ([8, 21) s) stored; 6 and 8 not yet. Both holes join samples
    unmeasured; the store names only the first (MIN(sequence) above the watermark)."""
    e, p = flat(100.0)
    _two_holes(store, e, p)
    assert store.unmeasured_times("host-a", "gpu0", T0, T0 + 21 * S) == [
        (T0 + 49 * TENTH, T0 + 60 * TENTH),
        (T0 + 69 * TENTH, T0 + 80 * TENTH),
    ]


def test_a_request_inside_a_second_hole_is_not_final_before_the_batch_comes(store: Store) -> None:
    """As test_a_missing_batch_that_arrives_later_changes_a_request_inside_it, but the missing batch is the
    instance's second hole: 300 W in [7, 8) s, whose batch (sequence 8) comes late, after 6's hole is open too. A
    request in [7.2, 7.8] must not come out final with 100 W interpolated across it (60 J), never revised."""
    e, p = _bump(7.0, 8.0)
    writer = _two_holes(store, e, p)
    store.write_spans([span("r", "host-a", 7.2, 7.8)])
    clock = Clock(T0 + 21 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status != "final", result(store, "r")
    writer.sequence = 7
    write_samples(writer, 7.0, 7.9, e, p)  # 8, late
    for _ in range(3):
        clock.now_ns += 9 * S
        engine.run_pass()
    r = result(store, "r")
    assert r.active_j == pytest.approx(300 * 0.6, rel=1e-6), r


# -- the first sequence stored above the watermark has no chunk of this device


def _batch_without_devices(store: Store, sequence: int, at_s: float) -> None:
    """A stored batch of the agent of host-a with nothing of gpu0 (only spans, steps, a lost device...)."""
    store.write_batch(
        StoredBatch(
            instance_id="instance-host-a",
            sequence=sequence,
            oldest_pending_sequence=1,
            host=HostInfo("host-a"),
            received_ns=T0 + round(at_s * S),
        )
    )


def _hole_then_a_batch_without_the_device(store: Store, e: EnergyAt, p: EnergyAt) -> None:
    """Sequences 1-5 ([0, 5) s) stored, 6 ([5, 6) s) not yet, 7 without gpu0, 8-22 ([6, 21) s)."""
    writer = holding_writer(store)
    write_samples(writer, 0, 4.9, e, p)  # 1-5
    _batch_without_devices(store, 7, 6.5)
    writer.sequence = 7
    write_samples(writer, 6.0, 20, e, p)  # 8-22


def test_a_hole_whose_next_stored_batch_has_no_chunk_of_the_device_ends_where_the_samples_resume(store: Store) -> None:
    """Sequences 1-5 ([0, 5) s) stored, 6 ([5, 6) s) not yet, 7 without gpu0, 8-22 ([6, 21) s). The hole is
    [4.9, 6.0] s; the store makes it run to the window's end, over samples that are all there."""
    e, p = flat(100.0)
    _hole_then_a_batch_without_the_device(store, e, p)
    assert store.unmeasured_times("host-a", "gpu0", T0, T0 + 21 * S) == [(T0 + 49 * TENTH, T0 + 60 * TENTH)]


def test_a_request_after_a_hole_whose_next_batch_lacks_the_device_is_final(store: Store) -> None:
    """Same store; a request in [7.2, 7.8] s, well after the hole and with every sample around it stored (its
    window, from 4.2 s, holds sequence 5's samples): final with 60 J, not pending then approximate."""
    e, p = flat(100.0)
    _hole_then_a_batch_without_the_device(store, e, p)
    store.write_spans([span("r", "host-a", 7.2, 7.8)])
    engine_for(store, Clock(T0 + 21 * S), finalize_grace_s=30).run_pass()
    r = result(store, "r")
    assert (r.status, r.active_j) == ("final", pytest.approx(60.0, rel=1e-9)), r


# -- a new instance's first batch not stored yet: the hole does not begin at the window's start


def _a_restart_whose_first_batch_is_missing(store: Store) -> None:
    """100 W: instance A measures [0, 10) s; B's sequence 1 ([10, 11) s) is not stored yet, its 2-11 ([11, 21) s)
    are."""
    e, p = flat(100.0)
    write_samples(HostWriter(store, "host-a", instance="agent-1"), 0, 9.9, e, p)
    new = HostWriter(Holding(store), "host-a", instance="agent-2")  # type: ignore[arg-type]
    new.sequence = 1
    write_samples(new, 11.0, 20, e, p, device_offset_j=0.0)


def test_a_new_instance_s_first_batch_missing_does_not_reach_back_over_the_old_instance(store: Store) -> None:
    """Instance A measures [0, 10) s; B's sequence 1 ([10, 11) s) is not stored yet, its 2-11 ([11, 21) s) are. The
    restart break [9.9, 11.0] is unmeasured; [4, 9.9] was measured by A (B's hole was made to begin at the window's
    start: B has nothing at or below its watermark 0)."""
    _a_restart_whose_first_batch_is_missing(store)
    assert store.unmeasured_times("host-a", "gpu0", T0 + 4 * S, T0 + 15 * S) == [(T0 + 99 * TENTH, T0 + 110 * TENTH)]


def test_a_request_measured_by_the_old_instance_is_final_while_the_new_one_s_first_batch_is_missing(
    store: Store,
) -> None:
    """A request in [7.5, 8.5] s, measured by A and 1.4 s before its break: its window ([4.5, 11.5] s) holds B's
    first stored chunk; B's hole must not be made to run from 4.5 s (it was: r pending, approximate after the grace)."""
    _a_restart_whose_first_batch_is_missing(store)
    store.write_spans([span("r", "host-a", 7.5, 8.5)])
    engine_for(store, Clock(T0 + 21 * S), finalize_grace_s=30).run_pass()
    r = result(store, "r")
    assert (r.status, r.active_j) == ("final", pytest.approx(100.0, rel=1e-9)), r


# -- checks that pass (kept as evidence)


def test_a_hole_far_in_the_past_leaves_current_requests_final(store: Store) -> None:
    """Sequence 6 ([5, 6) s) never comes; a request at [40.2, 40.8] s is final."""
    e, p = flat(100.0)
    writer = holding_writer(store)
    write_samples(writer, 0, 4.9, e, p)
    writer.sequence = 6
    write_samples(writer, 6.0, 50, e, p)
    store.write_spans([span("r", "host-a", 40.2, 40.8)])
    engine_for(store, Clock(T0 + 51 * S), finalize_grace_s=30).run_pass()
    r = result(store, "r")
    assert (r.status, r.active_j) == ("final", pytest.approx(60.0, rel=1e-9)), r
    assert store.unmeasured_times("host-a", "gpu0", T0 + 37 * S, T0 + 44 * S) == []


def test_a_hole_given_up_by_the_agent_is_no_longer_named(store: Store) -> None:
    """Sequence 6 missing, 7-10 stored; then 11 with oldest_pending_sequence 11 (the agent gave 6 up): the watermark
    jumps to 11, stored_sequences below it go, no hole is left."""
    e, p = flat(100.0)
    writer = holding_writer(store)
    write_samples(writer, 0, 4.9, e, p)
    writer.sequence = 6
    write_samples(writer, 6.0, 9.9, e, p)  # 7-10
    assert store.unmeasured_times("host-a", "gpu0", T0, T0 + 11 * S) == [(T0 + 49 * TENTH, T0 + 60 * TENTH)]
    writer.store.oldest = 11  # type: ignore[attr-defined]
    write_samples(writer, 10.0, 10.9, e, p)  # 11
    assert store.unmeasured_times("host-a", "gpu0", T0, T0 + 11 * S) == []


def test_an_instance_restarting_twice_names_both_breaks(store: Store) -> None:
    e, p = flat(100.0)
    write_samples(HostWriter(store, "host-a", instance="agent-1"), 0, 3.9, e, p)
    write_samples(HostWriter(store, "host-a", instance="agent-2"), 5.0, 5.9, e, p, device_offset_j=0.0)
    write_samples(HostWriter(store, "host-a", instance="agent-3"), 7.0, 10, e, p, device_offset_j=0.0)
    assert store.unmeasured_times("host-a", "gpu0", T0, T0 + 11 * S) == [
        (T0 + 39 * TENTH, T0 + 50 * TENTH),
        (T0 + 59 * TENTH, T0 + 70 * TENTH),
    ]
