"""Databases at an older schema version, written with raw SQL, for the tests of the migration steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from collector.store import Store, open_store
from collector.store.base import SpanRow, labels_json
from collector.store.migrations import LATEST_VERSION, MIGRATIONS


def run(store: Store, work: Callable[[Any], Any], *, write: bool = False) -> Any:
    """``work(cursor)`` in one of the store's transactions."""
    return store._run(work, write=write)  # type: ignore[attr-defined]


def at_version(store_url: str, monkeypatch: pytest.MonkeyPatch, version: int, fill: Callable[[Any], None]) -> None:
    """A database at schema ``version`` (the steps after it held back) that ``fill`` (raw SQL) wrote."""
    with monkeypatch.context() as held_back:
        held_back.setattr("collector.store.sql.MIGRATIONS", MIGRATIONS[:version])
        held_back.setattr("collector.store.sql.LATEST_VERSION", version)
        old = open_store(store_url)
        try:
            assert old.migrate() == version
            run(old, fill, write=True)
        finally:
            old.close()


@contextmanager
def migrated(store_url: str) -> Iterator[Store]:
    """The database opened and migrated to the latest version; closed at the end."""
    new = open_store(store_url)
    try:
        assert new.migrate() == LATEST_VERSION
        yield new
    finally:
        new.close()


def insert_v4_span(cursor: Any, row: SpanRow, host_ref: int) -> None:
    """A span as schema 4 stored it: a row of the spans table."""
    cursor.execute(
        "INSERT INTO spans (request_id, span_id, host_ref, start_ns, end_ns, workload, pid, service_name, model, "
        "tenant, input_tokens, output_tokens, queue_end_ns, prefill_end_ns, labels, received_ns) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (row.request_id, row.span_id, host_ref, row.start_ns, row.end_ns, row.workload, row.pid, row.service_name,
         row.model, row.tenant, row.input_tokens, row.output_tokens, row.queue_end_ns, row.prefill_end_ns,
         labels_json(row.labels), row.received_ns),
    )  # fmt: skip
