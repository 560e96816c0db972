"""Storage URLs: which backend, the SQLite file a ``sqlite:`` URL names, and URLs safe to print (no password)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from collector.store.base import StoreError

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")
URL_FORMS = "sqlite:////absolute/path.db, sqlite:///relative/path.db or postgresql://user:password@host:5432/database"


def scheme(url: str) -> str:
    """``sqlite`` or ``postgresql``; a StoreError naming the accepted forms for anything else."""
    name = url.partition("://")[0].lower() if "://" in url else ""
    if name == "sqlite":
        return "sqlite"
    if name in POSTGRES_SCHEMES:
        return "postgresql"
    raise StoreError(f"storage url {redact(url)!r} is not one the aggregator can use: write {URL_FORMS}")


def sqlite_path(url: str) -> Path:
    """``sqlite:////var/lib/x.db`` -> ``/var/lib/x.db`` (four slashes: absolute); ``sqlite:///x.db`` -> ``x.db``."""
    if not url.lower().startswith(SQLITE_PREFIX):
        raise StoreError(f"storage url {url!r}: an SQLite url has three slashes before a path: {URL_FORMS}")
    path = url[len(SQLITE_PREFIX) :]
    if not path or path.endswith("/"):
        raise StoreError(f"storage url {url!r} names no file: write {URL_FORMS}")
    if path == ":memory:":
        raise StoreError(f"storage url {url!r}: the store needs a file (memory is not kept): write {URL_FORMS}")
    return Path(path)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
