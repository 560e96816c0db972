"""Batches checked in worker processes (``[ingest] workers``) are acknowledged, refused and stored exactly as when
the aggregator checks them itself: the same script of batches from several agents at once, valid and invalid
(each kind of refusal, the history-dependent ones and their order included), into two real aggregators."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from collector.proto import wattmeter_pb2 as pb
from tests.aggregator.conftest import (
    AggregatorFactory,
    RunningAggregator,
    batch,
    now_ns,
    send,
    simple_batch,
    workload,
)
from tests.aggregator.test_ingest import MUTATIONS, SECOND

FAR = 2**62
AGENTS = 4


def script(agent: int, start: int) -> list[bytes]:
    """One agent's batches, in the order it sends them."""
    instance, host = f"agent-{agent}", f"host-{agent}"

    def valid(sequence: int, second: int) -> pb.Batch:
        return simple_batch(sequence, start + second * SECOND, 1000.0 + 90.0 * second, instance, host)

    out = [valid(1, 0), valid(2, 1), valid(2, 1)]  # a duplicate
    for n, (mutate, _) in enumerate(MUTATIONS[agent::AGENTS]):
        bad = valid(3 + n, 2 + n)
        mutate(bad)
        out.append(bad)
    sequence = 3 + len(MUTATIONS[agent::AGENTS])
    goes_on = valid(sequence, 2)  # goes on from batch 2 (each refused batch only moved the watermark)
    goes_on.devices[0].power_w[2] = -5.0  # stored, without its power
    out.append(goes_on)
    going_back = valid(sequence + 1, 2)  # starts at the last stored sample: not after it
    going_back.devices[0].power_w.append(1.0)  # and a power count refused later in the order: the first wins
    out.append(going_back)
    later = start + 3 * SECOND
    on_known_device = batch(
        sequence + 2,
        [],
        [workload("train", "training", "gpu0", [later], [200.0])],  # gpu0 sent earlier by this instance
        instance=instance,
        host=host,
    )
    two_problems = batch(
        sequence + 3,
        [],
        [
            workload("train", "training", "gpu9", [later + SECOND], [1001.0]),  # never sent: refused first
            workload("train", "serving", "gpu0", [later + SECOND], [1001.0]),
        ],
        instance=instance,
        host=host,
    )
    out += [on_known_device, two_problems, valid(sequence + 4, 5)]
    out.append(b"\x08\x01\xff\xff not a batch")  # ends the stream
    return [m if isinstance(m, bytes) else m.SerializeToString() for m in out]


def run(running: RunningAggregator, scripts: list[list[bytes]]) -> dict[int, tuple[list[tuple[int, int, str]], object]]:
    """Every agent's script on its own stream, all at once; each agent's acks and how its stream ended."""
    results: dict[int, tuple[list[tuple[int, int, str]], object]] = {}

    def agent(index: int) -> None:
        with grpc.insecure_channel(running.target) as channel:
            result = send(channel, scripts[index])
        acks = [(a.acked_sequence, a.rejected_sequence, a.error) for a in result.acks]
        results[index] = (acks, result.code)

    threads = [threading.Thread(target=agent, args=(index,)) for index in range(AGENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def stored(running: RunningAggregator) -> dict[str, object]:
    """What the store and the metrics hold, less what depends on the clock (first and last seen)."""
    store = running.aggregator.store
    metrics = running.aggregator.metrics
    hosts = sorted(
        (h.hostname, h.machine_id, h.boot_id, [(d.device_id, d.kind, d.source, d.in_host_total) for d in h.devices])
        for h in store.hosts()
    )
    energy = [
        (r.hostname, r.workload, r.phase, r.job, r.energy_j, r.by_device_j) for r in store.workload_energy(0, FAR)
    ]
    samples = {
        (h[0], d[0]): store.device_samples(h[0], d[0], 0, FAR)
        for h in hosts
        for d in h[3]  # type: ignore[index]
    }
    workloads = {
        (r[0], r[1:4], device_id): store.workload_samples(r[0], r[1:4], device_id, 0, FAR)  # type: ignore[arg-type]
        for r in energy
        if r[1]
        for device_id in r[5]  # type: ignore[attr-defined]
    }
    return {
        "hosts": hosts,
        "energy": energy,
        "samples": samples,
        "workloads": workloads,
        "acked": [store.acked_sequence(f"agent-{n}") for n in range(AGENTS)],
        "batches": dict(metrics.batches),
        "samples_stored": metrics.samples_stored,
        "fleet_energy": metrics.fleet_energy,
        "dropped": dict(metrics.dropped_fields),
    }


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_processes_acknowledge_refuse_and_store_as_the_aggregator_alone(
    start_aggregator: AggregatorFactory, tmp_path: Path, workers: int
) -> None:
    start = now_ns() - 600 * SECOND
    alone = start_aggregator()
    with_workers = start_aggregator(
        storage={"url": f"sqlite:///{tmp_path / 'workers.db'}"}, ingest={"workers": workers}
    )
    assert with_workers.aggregator.checker.__class__.__name__ == "ProcessChecker"
    scripts = [script(agent, start) for agent in range(AGENTS)]
    expected = run(alone, scripts)
    assert run(with_workers, scripts) == expected
    assert stored(with_workers) == stored(alone)
    # the script meant what it says: each kind of refusal, in its order
    errors = [error for acks, _ in expected.values() for _, rejected, error in acks if rejected]
    for _, words in MUTATIONS:
        assert any(words in error for error in errors), words
    assert sum("not after the last stored sample" in error for error in errors) == AGENTS  # before power_w count
    assert sum("unknown device 'gpu9'" in error for error in errors) == AGENTS  # before the unknown phase
    assert {code for _, code in expected.values()} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert stored(alone)["dropped"] == {"power_w": AGENTS}
    assert stored(alone)["batches"] == {
        "stored": 5 * AGENTS,
        "duplicate": AGENTS,
        "rejected": len(MUTATIONS) + 2 * AGENTS,
    }


def test_on_postgresql_many_agents_at_once_store_each_batch_once(
    start_aggregator: AggregatorFactory, postgres_url: str
) -> None:
    """Group commits on PostgreSQL: several agents' batches in the same transactions, replays deduplicated."""
    running = start_aggregator(storage={"url": postgres_url})
    start = now_ns() - 600 * SECOND
    scripts = [
        [
            simple_batch(n, start + (n - 1) * SECOND, 1000.0 + 90.0 * (n - 1), f"pg-{agent}", f"pg-host-{agent}")
            for n in range(1, 6)
        ]
        for agent in range(AGENTS)
    ]
    payloads = [[b.SerializeToString() for b in script + script[:2]] for script in scripts]  # and replays
    results = run(running, payloads)
    for acks, code in results.values():
        assert code is None
        assert [(acked, rejected) for acked, rejected, _ in acks] == [(n, 0) for n in range(1, 6)] + [(5, 0)] * 2
    store = running.aggregator.store
    for agent in range(AGENTS):
        samples = store.device_samples(f"pg-host-{agent}", "gpu0", 0, FAR)
        assert [t for t, _, _ in samples] == [t for b in scripts[agent] for t in b.devices[0].time_ns]
    assert dict(running.aggregator.metrics.batches) == {"stored": 5 * AGENTS, "duplicate": 2 * AGENTS}
