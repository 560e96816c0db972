"""Group commit (``Store.write_batches``): many batches in one transaction store exactly what writing them one by
one stores, duplicates inside one group included; a group that fails stores nothing. On SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import pytest

from collector.store import Store, StoreError, open_store
from collector.store.base import StoredBatch, WriteResult
from collector.store.rows import pack
from tests.store.builders import INFERENCE, SAMPLES, TRAINING, batch, rejected

FOREVER = (0, 2**62)


def renamed(stored: StoredBatch, prefix: str) -> StoredBatch:
    """``stored`` for instance and host ``prefix + ...``: one database holds the same history twice."""
    host = (
        dataclasses.replace(stored.host, hostname=prefix + stored.host.hostname)
        if stored.host.hostname
        else stored.host
    )
    return dataclasses.replace(stored, instance_id=prefix + stored.instance_id, host=host)


def history() -> list[StoredBatch]:
    """Two instances on two hosts: in order, replays, a gap filled later, a jump by oldest_pending, a refused
    batch (stored empty), and the same (instance, sequence) twice in a row."""
    a = dict(instance="a", host="host-1", workloads=(TRAINING, INFERENCE))
    b = dict(instance="b", host="host-2", devices=(("gpu0", True), ("cpu0", False)))
    return [
        batch(1, **a),
        batch(1, **b),
        batch(2, **a),
        batch(2, **a),  # the same batch again: a duplicate inside the group
        batch(4, **a),  # out of order: 3 is missing
        batch(3, **b),
        batch(1, **a),  # a replay below the watermark
        rejected(2, instance="b"),  # b's 2 was refused: recorded empty, the watermark moves through it to 3
        batch(5, **a),
        batch(4, **a),  # stored above the watermark, out of order: still a duplicate
        batch(3, **a),  # fills the gap: 3, 4, 5 contiguous
        batch(8, oldest_pending=7, **b),  # b's agent dropped 4..6: the watermark jumps to 6
        batch(7, oldest_pending=7, **b),
        batch(10, oldest_pending=10, **a),  # a jump past sequences never stored
        batch(9, oldest_pending=9, **a),  # below the watermark now
    ]


def snapshot(store: Store, prefix: str) -> dict[str, object]:
    """What readers see of the instances and hosts named ``prefix...``."""
    hosts = {
        host.hostname[len(prefix) :]: (
            host.machine_id,
            host.boot_id,
            host.first_seen_ns,
            host.last_seen_ns,
            [dataclasses.astuple(device) for device in host.devices],
        )
        for host in store.hosts()
        if host.hostname.startswith(prefix)
    }
    energy = {
        (row.hostname[len(prefix) :], row.workload, row.phase, row.job): (row.energy_j, row.by_device_j)
        for row in store.workload_energy(*FOREVER)
        if row.hostname.startswith(prefix)
    }
    samples = {
        (host, device): store.device_samples(prefix + host, device, *FOREVER)
        for host, device in (("host-1", "gpu0"), ("host-2", "gpu0"), ("host-2", "cpu0"))
    }
    workload_samples = {
        workload: store.workload_samples(prefix + "host-1", workload, "gpu0", *FOREVER)
        for workload in (TRAINING, INFERENCE)
    }
    acked = {instance: store.acked_sequence(prefix + instance) for instance in ("a", "b")}
    return {"hosts": hosts, "energy": energy, "samples": samples, "workloads": workload_samples, "acked": acked}


def test_a_group_stores_what_one_by_one_stores(store: Store) -> None:
    one_by_one = [store.write_batch(renamed(b, "single-")) for b in history()]
    grouped = store.write_batches([renamed(b, "group-") for b in history()])
    assert grouped == one_by_one
    assert [r.stored for r in grouped] == [True, True, True, False, True, True, False, True, True, False, True, True,
                                           True, True, False]  # fmt: skip
    assert snapshot(store, "group-") == snapshot(store, "single-")
    assert store.acked_sequence("group-a") == 10
    assert store.acked_sequence("group-b") == 8
    assert len(snapshot(store, "group-")["samples"][("host-1", "gpu0")]) == 6 * SAMPLES  # type: ignore[index]


def test_groups_split_anywhere_store_the_same(store: Store) -> None:
    """A history written as groups of 1, 2, 3... batches: the same results and the same rows each time."""
    reference = [store.write_batch(renamed(b, "single-")) for b in history()]
    expected = snapshot(store, "single-")
    for size in (2, 3, 4, 7):
        prefix = f"by{size}-"
        batches = [renamed(b, prefix) for b in history()]
        results: list[WriteResult] = []
        for start in range(0, len(batches), size):
            results += store.write_batches(batches[start : start + size])
        assert results == reference, size
        assert snapshot(store, prefix) == expected, size


def test_an_instance_with_batches_waiting_above_its_watermark_before_the_group(store: Store) -> None:
    """Out-of-order batches already in the database (stored_sequences) are found by the group."""
    for prefix in ("single-", "group-"):
        store.write_batch(renamed(batch(1), prefix))
        store.write_batch(renamed(batch(3), prefix))
        store.write_batch(renamed(batch(5), prefix))
    later = [batch(4), batch(3), batch(2), batch(6), batch(5), batch(8)]
    one_by_one = [store.write_batch(renamed(b, "single-")) for b in later]
    grouped = store.write_batches([renamed(b, "group-") for b in later])
    assert grouped == one_by_one
    assert [(r.stored, r.acked_sequence) for r in grouped] == [
        (True, 1),
        (False, 1),
        (True, 5),  # 2 fills the gap: 3, 4 and 5 were waiting
        (True, 6),
        (False, 6),
        (True, 6),  # 8 waits for 7
    ]
    assert store.acked_sequence("group-instance-a") == 6
    # 8 waits above the watermark: a replay of it is a duplicate, 7 moves the watermark to 8
    assert store.write_batch(renamed(batch(8), "group-")).stored is False
    assert store.write_batch(renamed(batch(7), "group-")).acked_sequence == 8


def test_the_default_write_batches_writes_one_by_one(store: Store) -> None:
    """``Store.write_batches`` as a backend without group commit has it, on a real store."""
    results = Store.write_batches(store, [renamed(b, "default-") for b in history()])
    one_by_one = [store.write_batch(renamed(b, "single-")) for b in history()]
    assert results == one_by_one
    assert snapshot(store, "default-") == snapshot(store, "single-")


def test_a_failing_group_stores_nothing(store: Store) -> None:
    store.write_batch(batch(1))
    good = [batch(2), batch(1, instance="b", host="host-2"), batch(3)]
    rows = pack(batch(1, instance="c", host="host-3"))
    # a device without a kind breaks a NOT NULL constraint: the database refuses the whole transaction
    broken = dataclasses.replace(
        batch(1, instance="c", host="host-3"),
        devices=(),
        workloads=(),
        rollups=(),
        packed=dataclasses.replace(rows, devices=[(d[0], None, d[2], d[3]) for d in rows.devices]),  # type: ignore[misc]
    )
    with pytest.raises(StoreError):
        store.write_batches([*good, broken])
    assert (store.acked_sequence("instance-a"), store.acked_sequence("b"), store.acked_sequence("c")) == (1, 0, 0)
    assert len(store.device_samples("host-1", "gpu0", *FOREVER)) == SAMPLES
    assert [host.hostname for host in store.hosts()] == ["host-1"]
    # nothing half-written: the good batches store as they would have, once each
    assert [(r.stored, r.acked_sequence) for r in store.write_batches(good)] == [(True, 2), (True, 1), (True, 3)]
    assert len(store.device_samples("host-1", "gpu0", *FOREVER)) == 3 * SAMPLES


def test_empty_group(store: Store) -> None:
    assert store.write_batches([]) == []


def test_two_aggregators_writing_the_same_batches_at_once_store_each_once(store: Store, store_url: str) -> None:
    """Two stores on one database (two aggregators), each writing groups of the same instances' batches, in
    opposite orders of instances: no deadlock, every (instance, sequence) stored once, contiguous watermarks."""
    other = open_store(store_url)
    instances = [f"agent-{n}" for n in range(6)]
    sequences = range(1, 9)

    def groups(order: Sequence[str]) -> list[list[StoredBatch]]:
        return [[batch(s, instance=i, host=f"host-{i}", workloads=(TRAINING,)) for i in order] for s in sequences]

    results: dict[int, list[WriteResult]] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(index: int, writer: Store, order: Sequence[str]) -> None:
        start.wait()
        try:
            for group in groups(order):
                results[index] += writer.write_batches(group)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=write, args=(0, store, instances)),
        threading.Thread(target=write, args=(1, other, instances[::-1])),
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        other.close()
    assert errors == []
    stored = sum(r.stored for r in results[0]) + sum(r.stored for r in results[1])
    assert stored == len(instances) * len(sequences)
    for instance in instances:
        assert store.acked_sequence(instance) == len(sequences)
        samples = store.device_samples(f"host-{instance}", "gpu0", *FOREVER)
        assert len(samples) == len(sequences) * SAMPLES
        assert len({t for t, _, _ in samples}) == len(samples)
        workload = store.workload_samples(f"host-{instance}", TRAINING, "gpu0", *FOREVER)
        assert len(workload) == len(sequences) * SAMPLES
