"""The Store contract, run on SQLite and on a real PostgreSQL server (the ``store`` fixture is parametrized)."""

from __future__ import annotations

import numpy as np
import pytest

from collector.store import Store, StoreError, open_store
from collector.store.base import LastSample
from collector.store.migrations import LATEST_VERSION, MIGRATIONS, Migration
from tests.store.builders import (
    GPU_W,
    INFERENCE,
    MINUTE_NS,
    SAMPLE_NS,
    SAMPLES,
    T0_NS,
    TRAINING,
    WORKLOAD_W,
    batch,
    rejected,
    times,
)

BATCH_S = SAMPLES * SAMPLE_NS / 1e9
FOREVER = (0, 2**62)


def device_energy(store: Store, host: str = "host-1", device: str = "gpu0") -> list[float]:
    return [energy for _, energy, _ in store.device_samples(host, device, *FOREVER)]


def rollup_total(store: Store, workload: tuple[str, str, str] = ("", "", "")) -> float:
    return sum(
        row.energy_j for row in store.workload_energy(*FOREVER) if (row.workload, row.phase, row.job) == workload
    )


# -- schema


def test_migrate_twice_keeps_the_version_and_the_data(store: Store, store_url: str) -> None:
    store.write_batch(batch(1))
    assert store.migrate() == LATEST_VERSION
    again = open_store(store_url)
    try:
        assert again.migrate() == LATEST_VERSION
        assert len(device_energy(again)) == SAMPLES
    finally:
        again.close()


def test_migrate_applies_only_the_missing_steps_in_order(
    store: Store, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write_batch(batch(1))
    first, second = LATEST_VERSION + 1, LATEST_VERSION + 2
    notes = Migration(first, "a table of notes", ("CREATE TABLE notes (id {bigint} PRIMARY KEY, body TEXT NOT NULL)",))
    row = Migration(second, "a row in it", ("INSERT INTO notes (id, body) VALUES (1, 'ran after the table')",))
    monkeypatch.setattr("collector.store.sql.MIGRATIONS", (*MIGRATIONS, notes, row))
    monkeypatch.setattr("collector.store.sql.LATEST_VERSION", second)
    upgraded = open_store(store_url)
    try:
        assert upgraded.migrate() == second
        assert upgraded.migrate() == second  # the row's step would fail on a duplicate id if it ran twice
        assert len(device_energy(upgraded)) == SAMPLES
    finally:
        upgraded.close()


def test_a_schema_newer_than_the_code_is_refused(store: Store, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    future = LATEST_VERSION + 1
    step = Migration(future, "from the future", ("CREATE TABLE future (id {bigint})",))
    monkeypatch.setattr("collector.store.sql.MIGRATIONS", (*MIGRATIONS, step))
    monkeypatch.setattr("collector.store.sql.LATEST_VERSION", future)
    assert store.migrate() == future
    monkeypatch.undo()
    older = open_store(store_url)
    try:
        with pytest.raises(
            StoreError, match=rf"schema is version {future}, newer than this wattmeter's {LATEST_VERSION}"
        ):
            older.migrate()
    finally:
        older.close()


# -- write and read back


def test_a_batch_reads_back_exactly(store: Store) -> None:
    stored = batch(1, devices=(("gpu0", True), ("gpu1", True)), workloads=(TRAINING, INFERENCE))
    result = store.write_batch(stored)
    assert (result.stored, result.acked_sequence) == (True, 1)
    assert store.acked_sequence("instance-a") == 1

    samples = store.device_samples("host-1", "gpu1", *FOREVER)
    chunk = stored.devices[1]
    assert [t for t, _, _ in samples] == chunk.time_ns.tolist()
    assert [e for _, e, _ in samples] == chunk.energy_j.tolist()
    assert [p for _, _, p in samples] == [GPU_W] * SAMPLES
    workload = store.workload_samples("host-1", INFERENCE, "gpu0", *FOREVER)
    assert workload == list(
        zip(stored.workloads[1].time_ns.tolist(), stored.workloads[1].energy_j.tolist(), strict=True)
    )

    (host,) = store.hosts()
    assert (host.hostname, host.machine_id, host.boot_id) == ("host-1", "machine-host-1", "boot-1")
    assert host.first_seen_ns == host.last_seen_ns == stored.received_ns
    assert [(d.device_id, d.kind, d.source, d.in_host_total) for d in host.devices] == [
        ("gpu0", "gpu", "simulated", True),
        ("gpu1", "gpu", "simulated", True),
    ]


def test_samples_without_power_read_back_as_none(store: Store) -> None:
    store.write_batch(batch(1, power=False))
    assert [p for _, _, p in store.device_samples("host-1", "gpu0", *FOREVER)] == [None] * SAMPLES


def test_samples_are_cut_to_the_window(store: Store) -> None:
    for sequence in (1, 2, 3):
        store.write_batch(batch(sequence))
    since, until = T0_NS + 15 * SAMPLE_NS, T0_NS + 22 * SAMPLE_NS  # from inside batch 2 into batch 3
    samples = store.device_samples("host-1", "gpu0", since, until)
    assert [t for t, _, _ in samples] == list(range(since, until, SAMPLE_NS))
    assert store.device_samples("host-1", "gpu9", *FOREVER) == []
    assert store.device_samples("host-9", "gpu0", *FOREVER) == []
    assert store.workload_samples("host-1", ("nope", "", ""), "gpu0", *FOREVER) == []


def test_samples_continue_across_agent_instances(store: Store) -> None:
    """A restarted agent's counters start anew; readers get one counter that carries on."""
    store.write_batch(batch(1, instance="old", counter_start_j=5_000.0))
    store.write_batch(batch(2, instance="old", counter_start_j=5_000.0))
    # the new agent's first batch starts 1 s after the old one's last; its counter starts near 0
    new_start = T0_NS + 3 * SAMPLES * SAMPLE_NS
    store.write_batch(batch(1, instance="new", start_ns=new_start, counter_start_j=-900.0))
    energy = device_energy(store)
    assert len(energy) == 3 * SAMPLES
    assert np.all(np.diff(energy) >= 0)
    old_last = energy[2 * SAMPLES - 1]
    assert energy[2 * SAMPLES] == pytest.approx(old_last)  # the unmeasured second counts as nothing
    assert energy[-1] - energy[2 * SAMPLES] == pytest.approx(GPU_W * (SAMPLES - 1) * SAMPLE_NS / 1e9)
    workload = [e for _, e in store.workload_samples("host-1", TRAINING, "gpu0", *FOREVER)]
    assert len(workload) == 3 * SAMPLES and np.all(np.diff(workload) >= 0)


# -- dedup and the watermark


def test_the_same_batch_twice_is_stored_once(store: Store) -> None:
    first = store.write_batch(batch(1))
    second = store.write_batch(batch(1))
    assert (first.stored, second.stored) == (True, False)
    assert second.acked_sequence == 1
    assert len(device_energy(store)) == SAMPLES
    assert rollup_total(store) == pytest.approx(GPU_W * BATCH_S)
    assert rollup_total(store, TRAINING) == pytest.approx(WORKLOAD_W * BATCH_S)


def test_watermark_waits_for_gaps_and_duplicates_above_it_are_caught(store: Store) -> None:
    def write(sequence: int, oldest_pending: int = 1) -> tuple[bool, int]:
        result = store.write_batch(batch(sequence, oldest_pending=oldest_pending))
        return result.stored, result.acked_sequence

    assert write(1) == (True, 1)
    assert write(3) == (True, 1)
    assert write(4) == (True, 1)
    assert write(3) == (False, 1)  # stored above the watermark: still a duplicate
    assert write(2) == (True, 4)  # fills the gap: 2, 3, 4 are contiguous
    assert write(3) == (False, 4)  # at or below the watermark
    assert write(6) == (True, 4)
    # the agent dropped 5 from its spool (oldest pending 7): the watermark jumps to 6, then 8 is missing... 7 arrives
    assert write(8, oldest_pending=7) == (True, 6)
    assert write(7, oldest_pending=7) == (True, 8)
    # a jump past sequences never stored, then a replay of one of them is below the watermark
    assert write(12, oldest_pending=12) == (True, 12)
    assert write(10, oldest_pending=10) == (False, 12)
    assert store.acked_sequence("instance-a") == 12
    assert len(device_energy(store)) == 8 * SAMPLES  # 1, 2, 3, 4, 6, 7, 8, 12


def test_watermarks_are_per_instance(store: Store) -> None:
    store.write_batch(batch(1, instance="a"))
    store.write_batch(batch(2, instance="a"))
    assert store.write_batch(batch(1, instance="b", host="host-2")).acked_sequence == 1
    assert store.write_batch(batch(2, instance="a")).stored is False
    assert (store.acked_sequence("a"), store.acked_sequence("b"), store.acked_sequence("never")) == (2, 1, 0)


def test_a_rejected_batch_counts_for_the_watermark_and_stores_nothing(store: Store) -> None:
    assert store.write_batch(rejected(1)).acked_sequence == 1
    assert store.hosts() == []
    assert store.write_batch(batch(3)).acked_sequence == 1
    result = store.write_batch(rejected(2))
    assert (result.stored, result.acked_sequence) == (True, 3)
    assert store.write_batch(rejected(2)).stored is False
    assert [h.hostname for h in store.hosts()] == ["host-1"]
    assert len(device_energy(store)) == SAMPLES


# -- rollups and workload energy


def test_rollup_increments_add_up(store: Store) -> None:
    store.write_batch(batch(1, rollup_j=1.5))
    store.write_batch(batch(2, rollup_j=2.0))
    store.write_batch(batch(2, rollup_j=100.0))  # a duplicate adds nothing
    later = batch(3, rollup_j=4.0, start_ns=T0_NS + MINUTE_NS)  # the next minute
    store.write_batch(later)
    (row,) = [r for r in store.workload_energy(*FOREVER) if r.workload == TRAINING[0]]
    assert row.energy_j == pytest.approx(7.5)
    assert row.by_device_j == pytest.approx({"gpu0": 7.5})
    (first_minute,) = [r for r in store.workload_energy(T0_NS, T0_NS + MINUTE_NS) if r.workload == TRAINING[0]]
    assert first_minute.energy_j == pytest.approx(3.5)


def test_workload_energy_counts_host_totals_and_filters_by_phase(store: Store) -> None:
    devices = (("gpu0", True), ("cpu0", True), ("core0", False))  # core0 is part of package cpu0
    store.write_batch(batch(1, devices=devices, workloads=(TRAINING, INFERENCE), rollup_j=10.0))
    store.write_batch(batch(1, instance="b", host="host-2", workloads=(INFERENCE,), rollup_j=3.0))
    store.write_batch(batch(2, rollup_j=1_000.0, start_ns=T0_NS + 2 * MINUTE_NS))  # outside the window below

    rows = store.workload_energy(T0_NS, T0_NS + MINUTE_NS)
    by_key = {(r.hostname, r.workload, r.phase, r.job): r for r in rows}
    assert sorted(by_key) == [
        ("host-1", "", "", ""),  # the devices' own energy
        ("host-1", *INFERENCE),
        ("host-1", *TRAINING),
        ("host-2", "", "", ""),
        ("host-2", *INFERENCE),
    ]
    training = by_key[("host-1", *TRAINING)]
    assert training.energy_j == pytest.approx(20.0)  # gpu0 and cpu0, not the core inside cpu0
    assert training.by_device_j == pytest.approx({"gpu0": 10.0, "cpu0": 10.0, "core0": 10.0})

    inference = store.workload_energy(T0_NS, T0_NS + MINUTE_NS, phase="inference")
    assert [(r.hostname, r.workload, r.energy_j) for r in inference] == [
        ("host-1", "serve-llm", 20.0),
        ("host-2", "serve-llm", 3.0),
    ]
    assert store.workload_energy(T0_NS, T0_NS + MINUTE_NS, phase="batch") == []


# -- last sample, prune


def test_last_sample_is_the_instances_own(store: Store) -> None:
    store.write_batch(batch(1, instance="old"))
    store.write_batch(batch(2, instance="old"))
    store.write_batch(batch(1, instance="new", start_ns=T0_NS + 5 * SAMPLES * SAMPLE_NS, counter_start_j=0.0))
    last_old_t = int(times(T0_NS + SAMPLES * SAMPLE_NS)[-1])
    seconds = (last_old_t - T0_NS) / 1e9
    assert store.last_sample("old", "gpu0") == LastSample(last_old_t, 1_000.0 + GPU_W * seconds)
    assert store.last_sample("old", "gpu0", TRAINING) == LastSample(last_old_t, WORKLOAD_W * seconds)
    new = store.last_sample("new", "gpu0")
    assert new is not None and new.time_ns > last_old_t
    assert store.last_sample("old", "gpu7") is None
    assert store.last_sample("old", "gpu0", INFERENCE) is None
    assert store.last_sample("unknown", "gpu0") is None
    store.write_batch(rejected(1, instance="rejected-only"))
    assert store.last_sample("rejected-only", "gpu0") is None


def test_prune_drops_old_raw_chunks_and_old_rollups(store: Store) -> None:
    hour = 3_600_000_000_000
    store.write_batch(batch(1))  # raw and rollups at T0
    store.write_batch(batch(2, start_ns=T0_NS + 2 * hour))  # two hours later
    now = T0_NS + 2 * hour + 30_000_000_000
    # raw kept 1 h: batch 1's device chunk and workload chunk go; rollups kept 1 day: all stay
    assert store.prune(now, raw_retention_s=3_600, rollup_retention_s=86_400) == 2
    kept = [t for t, _, _ in store.device_samples("host-1", "gpu0", *FOREVER)]
    assert kept == times(T0_NS + 2 * hour).tolist()
    assert len(store.workload_samples("host-1", TRAINING, "gpu0", *FOREVER)) == SAMPLES
    # rollups kept 1 h: the two rollups of T0's minute go (the device's own and the workload's)
    assert store.prune(now, raw_retention_s=3_600, rollup_retention_s=3_600) == 2
    assert rollup_total(store) == pytest.approx(GPU_W * BATCH_S)
    assert store.prune(now, raw_retention_s=3_600, rollup_retention_s=3_600) == 0
    assert store.write_batch(batch(2)).stored is False  # dedup does not depend on the raw chunks


def test_a_closed_store_says_so(store_url: str) -> None:
    closed = open_store(store_url)
    closed.migrate()
    closed.close()
    with pytest.raises(StoreError, match="closed"):
        closed.write_batch(batch(1))
