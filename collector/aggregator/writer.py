"""Group commit: one thread writes the batches waiting to be stored, as many as are queued (up to a limit), in one
transaction (``Store.write_batches``), so one commit (one sync to disk) serves them all.

No timer: a batch queued while the store is idle is written at once; batches queued while a group is being written
form the next group. Each waiter gets its batch's own ``WriteResult`` once the transaction holding it committed.
A group that fails is written again one batch at a time, so one bad batch fails alone and nothing is lost or
stored twice (the failed transaction stored nothing; dedup covers a commit lost with its connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from collector.store.base import Store, StoredBatch, WriteResult

log = logging.getLogger(__name__)

MAX_GROUP_BATCHES = 512
MAX_GROUP_SAMPLES = 500_000  # device + workload samples in one transaction (one batch alone may be more)


@dataclass
class _Item:
    batch: StoredBatch
    samples: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[WriteResult]


class GroupWriter:
    def __init__(
        self,
        store: Store,
        *,
        max_batches: int = MAX_GROUP_BATCHES,
        max_samples: int = MAX_GROUP_SAMPLES,
        on_commit: Callable[[int], None] = lambda batches: None,
    ) -> None:
        self.store = store
        self.max_batches = max_batches
        self.max_samples = max_samples
        self._on_commit = on_commit  # batches in a transaction that committed
        self._queue: deque[_Item] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: StoredBatch, samples: int = 0) -> asyncio.Future[WriteResult]:
        """A future (of the running event loop) of ``batch`` stored (committed) with the next group, or of what the
        store raised for it. Cancelling the future does not take the batch back."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WriteResult] = loop.create_future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the store writer is closed")
            self._queue.append(_Item(batch, samples, loop, future))
            self._wake.notify()
        return future

    def close(self, timeout_s: float) -> None:
        """Write what is queued, then stop; waits up to ``timeout_s`` for the thread (a stuck store is left to it)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _take(self) -> list[_Item] | None:
        with self._wake:
            while not self._queue:
                if self._closed:
                    return None
                self._wake.wait()
            group = [self._queue.popleft()]
            samples = group[0].samples
            while (
                self._queue and len(group) < self.max_batches and samples + self._queue[0].samples <= self.max_samples
            ):
                item = self._queue.popleft()
                samples += item.samples
                group.append(item)
            return group

    def _run(self) -> None:
        while (group := self._take()) is not None:
            try:
                results = self._write([item.batch for item in group])
            except BaseException as exc:  # a bug here: its waiters hear of it rather than wait forever
                log.exception("the store writer failed")
                results = [exc] * len(group)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item, WriteResult | BaseException]]] = {}
            for item, result in zip(group, results, strict=True):
                by_loop.setdefault(item.loop, []).append((item, result))
            for loop, answers in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(_answer, answers)

    def _write(self, batches: list[StoredBatch]) -> list[WriteResult | BaseException]:
        try:
            results: list[WriteResult | BaseException] = list(self.store.write_batches(batches))
            self._on_commit(len(batches))
            return results
        except Exception as exc:
            if len(batches) == 1:
                return [exc]
            log.warning("writing %d batches in one transaction failed (%s): writing them one by one", len(batches), exc)
        out: list[WriteResult | BaseException] = []
        for batch in batches:
            try:
                out.append(self.store.write_batch(batch))
                self._on_commit(1)
            except Exception as exc:
                out.append(exc)
        return out


def _answer(answers: list[tuple[_Item, WriteResult | BaseException]]) -> None:
    for item, result in answers:
        if item.future.done():  # its waiter was cancelled
            continue
        if isinstance(result, BaseException):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)
