"""Random batch orders and duplicates against a model of the watermark; and several writers at once. Both backends."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.store import Store, open_store
from collector.store.base import StoredBatch
from tests.store.builders import SAMPLE_NS, SAMPLES, T0_NS, batch, rejected

ROLLUP_J = 2.0
FOREVER = (0, 2**62)


@dataclass
class ModelInstance:
    """The rule the store must follow, on a Python set."""

    stored: set[int] = field(default_factory=set)
    watermark: int = 0

    def write(self, sequence: int, oldest_pending: int) -> tuple[bool, int]:
        if sequence <= self.watermark or sequence in self.stored:
            return False, self.watermark
        self.stored.add(sequence)
        self.watermark = max(self.watermark, oldest_pending - 1)
        while self.watermark + 1 in self.stored:
            self.watermark += 1
        return True, self.watermark


@st.composite
def writes(draw: st.DrawFn) -> list[tuple[int, int, int, bool]]:
    """(instance 0/1, sequence, oldest pending <= sequence, rejected?) in any order, with repeats."""
    count = draw(st.integers(1, 16))
    result = []
    for _ in range(count):
        sequence = draw(st.integers(1, 10))
        oldest_pending = draw(st.integers(1, sequence))
        result.append((draw(st.integers(0, 1)), sequence, oldest_pending, draw(st.booleans())))
    return result


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=writes())
def test_random_orders_and_duplicates_follow_the_model(
    store: Store, operations: list[tuple[int, int, int, bool]]
) -> None:
    # one store serves every example: fresh instance ids and host names keep the examples apart
    run = uuid.uuid4().hex[:8]
    instances = [f"{run}-a", f"{run}-b"]
    hostname = f"host-{run}"
    models = [ModelInstance(), ModelInstance()]
    with_data = 0
    for index, sequence, oldest_pending, is_rejected in operations:
        instance = instances[index]
        start_ns = T0_NS + (sequence * 2 + index) * SAMPLES * SAMPLE_NS  # no two batches share a sample time
        stored_batch = (
            rejected(sequence, instance=instance, oldest_pending=oldest_pending)
            if is_rejected
            else batch(
                sequence,
                instance=instance,
                host=hostname,
                oldest_pending=oldest_pending,
                start_ns=start_ns,
                rollup_j=ROLLUP_J,
            )
        )
        result = store.write_batch(stored_batch)
        assert (result.stored, result.acked_sequence) == models[index].write(sequence, oldest_pending)
        with_data += result.stored and not is_rejected

    assert [store.acked_sequence(i) for i in instances] == [m.watermark for m in models]
    # what was stored is there once, and nothing else
    assert len(store.device_samples(hostname, "gpu0", *FOREVER)) == with_data * SAMPLES
    own = [r.energy_j for r in store.workload_energy(*FOREVER) if r.hostname == hostname and r.workload == ""]
    assert sum(own) == pytest.approx(with_data * ROLLUP_J)


def write_all(store: Store, batches: Sequence[StoredBatch], start: threading.Barrier, results: list[bool]) -> None:
    start.wait()
    results.extend(store.write_batch(b).stored for b in batches)


def test_concurrent_writers_store_every_batch_once(store_url: str) -> None:
    """Two aggregators (stores) on one database, two threads each, writing overlapping batches at once."""
    stores = [open_store(store_url), open_store(store_url)]
    for each in stores:
        each.migrate()
    shared_sequences = 30
    threads: list[threading.Thread] = []
    results: list[list[bool]] = []
    start = threading.Barrier(4)
    try:
        for worker in range(4):
            rng = random.Random(worker)
            shared = [
                batch(s, instance="shared", host="shared-host", rollup_j=ROLLUP_J)
                for s in range(1, shared_sequences + 1)
            ]
            own = [batch(s, instance=f"own-{worker}", host=f"host-{worker}", rollup_j=ROLLUP_J) for s in range(1, 11)]
            mine = shared + own
            rng.shuffle(mine)
            results.append([])
            threads.append(
                threading.Thread(target=write_all, args=(stores[worker % 2], mine, start, results[-1]), daemon=True)
            )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        reader = stores[0]
        assert sum(sum(r) for r in results) == shared_sequences + 4 * 10  # each batch stored by exactly one write
        assert reader.acked_sequence("shared") == shared_sequences
        assert [reader.acked_sequence(f"own-{w}") for w in range(4)] == [10] * 4
        assert len(reader.device_samples("shared-host", "gpu0", *FOREVER)) == shared_sequences * SAMPLES
        totals = {r.hostname: r.energy_j for r in reader.workload_energy(*FOREVER) if r.workload == ""}
        expected = {"shared-host": shared_sequences * ROLLUP_J} | {f"host-{w}": 10 * ROLLUP_J for w in range(4)}
        assert totals == pytest.approx(expected)
    finally:
        for each in stores:
            each.close()
