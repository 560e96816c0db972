"""SQLite backend: one file, WAL, synchronous=FULL (a commit is on disk before the batch is acknowledged).

Writes go through one connection behind a lock: SQLite takes one writer at a time anyway, and queuing on a Python
lock is cheaper and fairer than SQLite's busy-wait sleeps. Reads use a pool of their own connections, which WAL
lets run beside the writer. ``BEGIN IMMEDIATE`` still locks the file against another process writing it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from collector.store.base import StoreError, StoreMissing
from collector.store.dialect import SQLITE
from collector.store.pool import ConnectionPool
from collector.store.sql import Cursor, SqlStore, T

BUSY_TIMEOUT_S = 30.0  # another process holding the write lock (a second aggregator, a backup) is waited for


class SqliteStore(SqlStore):
    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        max_idle_readers: int = 4,
        create: bool = True,
    ) -> None:
        """``create=False``: open an existing file read-only (``mode=ro``), creating nothing; StoreMissing if there
        is none."""
        super().__init__(SQLITE)
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._read_only = not create
        if not create and not path.is_file():
            raise StoreMissing(
                f"no SQLite database at {path}: check the storage url (the aggregator creates the file when it "
                "first starts)"
            )
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the directory of SQLite database {path}: {exc.strerror or exc}; "
                "create it (writable by this user) or set [storage] url to a file elsewhere"
            ) from exc
        self._writer = self._connect()
        self._write_lock = threading.Lock()
        self._readers = ConnectionPool(self._connect_reader, _close, max_idle=max_idle_readers)
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        target = f"file:{quote(str(self.path))}?mode=ro" if self._read_only else str(self.path)
        try:
            # isolation_level=None: transactions are the explicit BEGIN/COMMIT in _transaction
            connection = sqlite3.connect(
                target,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
                uri=self._read_only,
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        if self._read_only:  # reads only: the file's journal mode is the writer's business
            return connection
        try:
            (journal_mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute(f"PRAGMA busy_timeout={round(self._busy_timeout_s * 1000)}")
        except sqlite3.Error as exc:
            connection.close()
            raise self._error(exc) from exc
        if str(journal_mode).lower() != "wal":
            connection.close()
            raise StoreError(
                f"SQLite database {self.path} cannot use write-ahead logging (journal_mode stays {journal_mode}): "
                "put it on a local file system"
            )
        return connection

    def _connect_reader(self) -> sqlite3.Connection:
        connection = self._connect()
        connection.execute("PRAGMA query_only=ON")
        return connection

    def _error(self, exc: sqlite3.Error) -> StoreError:
        """A StoreError that says what to do about ``exc``."""
        text = str(exc)
        if "file is not a database" in text:
            return StoreError(
                f"{self.path} is not an SQLite database (SQLite says: {text}): "
                "move it away or set [storage] url to another file"
            )
        if "unable to open database file" in text or "readonly database" in text:
            return StoreError(
                f"cannot open SQLite database {self.path} (SQLite says: {text}): check that this user may read "
                "and write it and its directory, or set [storage] url to another file"
            )
        return StoreError(f"SQLite database {self.path}: {text}")

    def _run(self, work: Callable[[Cursor], T], *, write: bool) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        if write:
            with self._write_lock:
                if self._closed:
                    raise StoreError("the store is closed")
                return self._transaction(self._writer, "BEGIN IMMEDIATE", work)
        with self._readers.connection() as connection:
            return self._transaction(connection, "BEGIN", work)

    def _transaction(self, connection: sqlite3.Connection, begin: str, work: Callable[[Cursor], T]) -> T:
        cursor = connection.cursor()
        try:
            cursor.execute(begin)
            result = work(cursor)
            cursor.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        finally:
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the error that got us here is the one to report
                    connection.execute("ROLLBACK")
            cursor.close()

    def _lock_schema(self, cursor: Cursor) -> None:
        """``BEGIN IMMEDIATE`` has locked the database already."""

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
        self._readers.close()


def _close(connection: sqlite3.Connection) -> None:
    connection.close()
