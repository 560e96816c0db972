"""A small pool of database connections shared by the aggregator's threads: a connection serves one call at a time,
idle ones are reused, broken ones are closed instead of returned."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from collector.store.base import StoreError

C = TypeVar("C")


class ConnectionPool(Generic[C]):
    def __init__(
        self,
        connect: Callable[[], C],
        close: Callable[[C], None],
        *,
        reusable: Callable[[C], bool] = lambda _connection: True,
        max_idle: int = 8,
    ) -> None:
        self._connect = connect
        self._close = close
        self._reusable = reusable
        self._max_idle = max_idle
        self._idle: list[C] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[C]:
        """An idle connection, or a new one; it goes back to the pool (or is closed) when the block ends."""
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._connect()
        try:
            yield connection
        finally:
            self._release(connection)

    def _release(self, connection: C) -> None:
        with self._lock:
            keep = not self._closed and len(self._idle) < self._max_idle and self._reusable(connection)
            if keep:
                self._idle.append(connection)
        if not keep:
            self._close(connection)

    def close(self) -> None:
        """Close the idle connections now and those in use when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            self._close(connection)
