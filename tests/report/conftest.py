"""Tests here that ask for ``store_url`` run on SQLite and on PostgreSQL (see tests/fakes/databases.py)."""

from tests.fakes.databases import store_url  # noqa: F401
