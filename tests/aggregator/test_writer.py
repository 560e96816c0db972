"""Group commit (``GroupWriter``) on a real SQLite store: batches queued while a group is written go in the next
group, one transaction; each waiter gets its own batch's result, duplicates inside a group included; a group that
fails is written again batch by batch, so only the bad batch fails; closing writes what is queued."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from collector.aggregator.writer import GroupWriter
from collector.store import StoreError
from collector.store.base import StoredBatch, WriteResult
from collector.store.rows import pack
from collector.store.sqlite import SqliteStore
from tests.aggregator.conftest import WAIT_S
from tests.store.builders import SAMPLES, batch

FOREVER = (0, 2**62)


class GatedStore(SqliteStore):
    """A real SQLite store whose group writes wait for ``gate``; it records each group."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.groups: list[list[tuple[str, int]]] = []

    def write_batches(self, batches: Sequence[StoredBatch]) -> list[WriteResult]:
        self.writing.set()
        assert self.gate.wait(WAIT_S)
        self.groups.append([(b.instance_id, b.sequence) for b in batches])
        return super().write_batches(batches)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GatedStore]:
    opened = GatedStore(tmp_path / "aggregator.db")
    opened.migrate()
    yield opened
    opened.close()


def broken(sequence: int, instance: str) -> StoredBatch:
    """A batch the database refuses: a device without a kind (NOT NULL)."""
    good = batch(sequence, instance=instance, host=f"host-{instance}")
    rows = pack(good)
    bad_rows = dataclasses.replace(rows, devices=[(d[0], None, d[2], d[3]) for d in rows.devices])  # type: ignore[misc]
    return dataclasses.replace(good, devices=(), workloads=(), rollups=(), packed=bad_rows)


async def queued_behind_a_group(
    writer: GroupWriter, store: GatedStore, batches: list[StoredBatch]
) -> list[WriteResult | BaseException]:
    """``batches`` submitted while the writer is busy with another batch: they are the next group."""
    first = writer.submit(batch(1, instance="first", host="host-first"))
    while not store.writing.is_set():
        await asyncio.sleep(0.01)
    futures = [writer.submit(one, SAMPLES) for one in batches]
    store.gate.set()
    assert (await first).stored
    return list(await asyncio.gather(*futures, return_exceptions=True))


def test_batches_waiting_go_in_one_transaction_duplicates_included(store: GatedStore) -> None:
    commits: list[int] = []
    writer = GroupWriter(store, on_commit=commits.append)
    group = [batch(1), batch(1, instance="b", host="host-2"), batch(1), batch(2), batch(2, instance="b", host="host-2")]
    results = asyncio.run(asyncio.wait_for(queued_behind_a_group(writer, store, group), WAIT_S))
    writer.close(WAIT_S)
    assert store.groups == [[("first", 1)], [(b.instance_id, b.sequence) for b in group]]
    assert commits == [1, len(group)]
    assert [(r.stored, r.acked_sequence) for r in results] == [(True, 1), (True, 1), (False, 1), (True, 2), (True, 2)]  # type: ignore[union-attr]
    assert len(store.device_samples("host-1", "gpu0", *FOREVER)) == 2 * SAMPLES
    assert (store.acked_sequence("instance-a"), store.acked_sequence("b")) == (2, 2)


def test_a_failing_group_is_written_batch_by_batch_and_only_the_bad_batch_fails(store: GatedStore) -> None:
    commits: list[int] = []
    writer = GroupWriter(store, on_commit=commits.append)
    group = [batch(1), broken(1, "c"), batch(2), batch(1, instance="b", host="host-2")]
    results = asyncio.run(asyncio.wait_for(queued_behind_a_group(writer, store, group), WAIT_S))
    writer.close(WAIT_S)
    assert isinstance(results[1], StoreError)
    assert [(r.stored, r.acked_sequence) for r in (results[0], results[2], results[3])] == [
        (True, 1),
        (True, 2),
        (True, 1),
    ]  # type: ignore[union-attr]
    assert commits == [1, 1, 1, 1]  # the group's transaction did not commit; three batches alone did
    assert len(store.device_samples("host-1", "gpu0", *FOREVER)) == 2 * SAMPLES  # nothing twice
    assert (store.acked_sequence("instance-a"), store.acked_sequence("b"), store.acked_sequence("c")) == (2, 1, 0)
    assert "host-c" not in [host.hostname for host in store.hosts()]


def test_closing_writes_what_is_queued(store: GatedStore) -> None:
    writer = GroupWriter(store)

    async def work() -> list[asyncio.Future[WriteResult]]:
        futures = [writer.submit(batch(n)) for n in (1, 2, 3)]
        while not store.writing.is_set():
            await asyncio.sleep(0.01)
        return futures

    loop = asyncio.new_event_loop()
    try:
        futures = loop.run_until_complete(work())
        closing = threading.Thread(target=writer.close, args=(WAIT_S,))
        closing.start()
        store.gate.set()
        closing.join(WAIT_S)
        loop.run_until_complete(asyncio.wait_for(asyncio.gather(*futures), WAIT_S))
    finally:
        loop.close()
    assert [f.result().acked_sequence for f in futures] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(_submit_one(writer))


async def _submit_one(writer: GroupWriter) -> WriteResult:
    return await writer.submit(batch(4))
