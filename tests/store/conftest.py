"""Every test here that asks for ``store`` runs on SQLite and on PostgreSQL (see tests/fakes/databases.py)."""

from tests.fakes.databases import postgres_url, store, store_url  # noqa: F401
