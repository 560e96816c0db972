"""PostgreSQL backend (psycopg 3): several aggregators may share one database.

Each call takes a pooled connection and runs in one transaction (READ COMMITTED; ``SqlStore`` serializes the writes
of one agent instance with a row lock). A call that fails because the connection dropped, or that PostgreSQL rolled
back (deadlock, serialization), is run again on a fresh connection: a write whose commit was lost with the
connection is then found stored and answered ``stored=False``, which still acknowledges it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from collector.store.base import StoreError
from collector.store.dialect import POSTGRES
from collector.store.pool import ConnectionPool
from collector.store.sql import Cursor, SqlStore, T
from collector.store.urls import redact

ATTEMPTS = 3
RETRY_PAUSE_S = 0.05  # times the attempt number, before each retry but the first
MIGRATION_LOCK = 0x7761_7474_6D65_7472  # "wattmetr": the advisory lock two aggregators migrating at once queue on
CONNECTION_DEFAULTS = {
    "connect_timeout": "10",
    "application_name": "wattmeter-aggregator",
    # a server gone without a word (host down, network cut) is noticed in about a minute, not the kernel's hours
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


@lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s`` (its SQL has no literal ``?`` or ``%``)."""
    return sql.replace("?", "%s")


class _PgCursor:
    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> object:
        return self._cursor.execute(_pg_sql(sql), params)

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object:
        self._cursor.executemany(_pg_sql(sql), params)
        return self

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount


class PostgresStore(SqlStore):
    def __init__(self, url: str, *, attempts: int = ATTEMPTS, max_idle: int = 8) -> None:
        super().__init__(POSTGRES)
        self._display = redact(url)
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError(
                f"storage url {self._display!r} is not a PostgreSQL url ({exc}): "
                "write postgresql://user:password@host:5432/database"
            ) from exc
        self._conninfo = make_conninfo(
            url, **{key: value for key, value in CONNECTION_DEFAULTS.items() if key not in params}
        )
        self._attempts = attempts
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self._connect, _close, reusable=_reusable, max_idle=max_idle
        )
        with self._pool.connection():  # a wrong url or a server that is down fails here, at start
            pass

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self._conninfo)
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())
            raise StoreError(
                f"cannot connect to PostgreSQL at {self._display}: {reason}; check [storage] url and that the "
                "server is up and accepts this user"
            ) from exc

    def _run(self, work: Callable[[Cursor], T], *, write: bool) -> T:
        failure: psycopg.Error | None = None
        for attempt in range(self._attempts):
            if attempt > 1:
                time.sleep(RETRY_PAUSE_S * attempt)
            with self._pool.connection() as connection:
                try:
                    with connection.cursor() as cursor:
                        result = work(_PgCursor(cursor))
                    connection.commit()
                    return result
                except psycopg.OperationalError as exc:
                    _rollback_quietly(connection)
                    if not (connection.broken or connection.closed or isinstance(exc, pg_errors.TransactionRollback)):
                        raise self._error(exc) from exc
                    failure = exc
                except psycopg.Error as exc:
                    _rollback_quietly(connection)
                    raise self._error(exc) from exc
                except BaseException:
                    _rollback_quietly(connection)
                    raise
        assert failure is not None
        raise StoreError(
            f"PostgreSQL at {self._display}: {' '.join(str(failure).split())} ({self._attempts} attempts)"
        ) from failure

    def _error(self, exc: psycopg.Error) -> StoreError:
        return StoreError(f"PostgreSQL at {self._display}: {' '.join(str(exc).split())}")

    def _lock_schema(self, cursor: Cursor) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))

    def close(self) -> None:
        self._pool.close()


def _rollback_quietly(connection: psycopg.Connection[Any]) -> None:
    if connection.closed or connection.broken:
        return
    try:
        connection.rollback()
    except psycopg.Error:
        connection.close()  # unusable: the pool drops it


def _reusable(connection: psycopg.Connection[Any]) -> bool:
    return (
        not connection.closed and not connection.broken and connection.info.transaction_status == TransactionStatus.IDLE
    )


def _close(connection: psycopg.Connection[Any]) -> None:
    connection.close()
