"""Aggregator storage: ``Store`` (base.py) with SQLite and PostgreSQL backends, chosen by URL (``open_store``)."""

from __future__ import annotations

from collector.store import urls
from collector.store.base import Store, StoreError

__all__ = ["Store", "StoreError", "open_store"]


def open_store(url: str, *, create: bool = True) -> Store:
    """The store a ``[storage] url`` names, connected (call ``migrate()`` before using it).

    ``sqlite:////var/lib/wattmeter/aggregator.db`` (four slashes: an absolute path; ``sqlite:///x.db`` is relative to
    the working directory; the directory is created) or ``postgresql://user:password@host:5432/database``. A URL
    that is wrong, a file that is not a database or a server that cannot be reached raise StoreError.

    ``create=False`` (readers such as ``wattmeter report``): an SQLite file is opened read-only as it is, and a
    missing one raises StoreMissing instead of being created; check ``schema_version()`` rather than migrating.
    """
    if urls.scheme(url) == "sqlite":
        from collector.store.sqlite import SqliteStore

        return SqliteStore(urls.sqlite_path(url), create=create)
    from collector.store.postgres import PostgresStore  # psycopg is imported only by those who use it

    return PostgresStore(url)
