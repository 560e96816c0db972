"""Real databases for the aggregator's tests: a fresh SQLite file, or a fresh schema on a real PostgreSQL server.

PostgreSQL comes from ``WATTMETER_TEST_POSTGRES_URL`` (default: the server and role ``scripts/install-test-tools.sh``
sets up). Each test gets its own schema (named in the URL's ``options=-csearch_path=...``), dropped after it, so runs
and tests never see each other's rows. Without a reachable server the PostgreSQL tests skip and say why, except
when ``WATTMETER_REQUIRE_POSTGRES=1`` (CI), where they fail.

Use from a conftest: ``from tests.fakes.databases import postgres_url, store, store_url  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from collector.store import Store, open_store
from collector.store.urls import redact

POSTGRES_URL_ENV = "WATTMETER_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "WATTMETER_REQUIRE_POSTGRES"
DEFAULT_POSTGRES_URL = "postgresql://wattmeter_test:wattmeter_test@127.0.0.1:5432/wattmeter_test"
SCHEMA_PREFIX = "wm_test_"
BACKENDS = ("sqlite", "postgresql")


def postgres_base_url() -> str:
    return os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL


@functools.cache
def postgres_unreachable(base_url: str) -> str | None:
    """Why the server at ``base_url`` cannot be used, or None when it can (asked once per run)."""
    try:
        with psycopg.connect(base_url, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        return (
            f"no PostgreSQL at {redact(base_url)} ({reason}): run scripts/install-test-tools.sh as root, "
            f"or set {POSTGRES_URL_ENV}"
        )


def require_postgres() -> str:
    """The server's base URL; skips the test when there is none (fails it under WATTMETER_REQUIRE_POSTGRES=1)."""
    base_url = postgres_base_url()
    reason = postgres_unreachable(base_url)
    if reason is not None:
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_POSTGRES_ENV}=1)")
        pytest.skip(reason)
    return base_url


def with_params(url: str, **params: str) -> str:
    """``url`` with query parameters (libpq connection parameters) added or replaced."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def application_name(url: str) -> str:
    return dict(parse_qsl(urlsplit(url).query))["application_name"]


def terminate_connections(url: str) -> int:
    """Kill the server side of every connection opened with ``url`` (told apart by its application_name)."""
    with psycopg.connect(postgres_base_url(), autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
            "AND pid <> pg_backend_pid()",
            (application_name(url),),
        ).fetchall()
    return sum(1 for (terminated,) in rows if terminated)


@contextlib.contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A URL whose connections work in a new, empty schema; the schema is dropped afterwards."""
    schema = SCHEMA_PREFIX + uuid.uuid4().hex[:12]
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield with_params(base_url, options=f"-csearch_path={schema}", application_name=schema)
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            # a connection a failed test left inside a transaction would hold the drop forever
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (schema,)
            )
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def sqlite_url(directory: Path) -> str:
    """``sqlite:////abs/path/aggregator.db`` (an absolute path: four slashes)."""
    return f"sqlite:///{directory.resolve() / 'aggregator.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of a fresh, empty PostgreSQL schema."""
    with postgres_schema(require_postgres()) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of a fresh database on each backend in turn."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    with postgres_schema(require_postgres()) as url:
        yield url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A migrated, empty store on each backend in turn, closed afterwards."""
    opened = open_store(store_url)
    opened.migrate()
    yield opened
    opened.close()
