"""SQLite specifics: URLs, the file and its directory, durability settings, clear errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from collector.store import StoreError, open_store
from collector.store.sqlite import SqliteStore
from collector.store.urls import sqlite_path
from tests.store.builders import batch


def test_four_slashes_are_an_absolute_path_and_three_a_relative_one() -> None:
    assert sqlite_path("sqlite:////var/lib/wattmeter/aggregator.db") == Path("/var/lib/wattmeter/aggregator.db")
    assert sqlite_path("sqlite:///aggregator.db") == Path("aggregator.db")
    assert sqlite_path("sqlite:///data/x.db") == Path("data/x.db")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://aggregator.db", "three slashes before a path"),
        ("sqlite:///", "names no file"),
        ("sqlite:///:memory:", "needs a file"),
        ("mysql://u:secret@db/x", "is not one the aggregator can use"),
        ("/var/lib/wattmeter/aggregator.db", "is not one the aggregator can use"),
    ],
)
def test_a_wrong_url_says_what_to_write(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as raised:
        open_store(url)
    assert "sqlite:////absolute/path.db" in str(raised.value)
    assert "secret" not in str(raised.value)


def test_the_directory_is_created_and_a_relative_path_is_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///state/nested/aggregator.db")
    try:
        store.migrate()
        assert store.write_batch(batch(1)).stored
    finally:
        store.close()
    assert (tmp_path / "state" / "nested" / "aggregator.db").is_file()


def test_wal_and_full_sync_so_an_acknowledged_batch_is_on_disk(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "aggregator.db")
    try:
        store.migrate()
        writer = store._writer  # the connection every write commits through
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert writer.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    finally:
        store.close()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.db"
    path.write_bytes(b"these are not the pages you are looking for\n" * 200)
    with pytest.raises(StoreError) as raised:
        open_store(f"sqlite:///{path}")
    message = str(raised.value)
    assert f"{path} is not an SQLite database" in message
    assert "set [storage] url to another file" in message
    assert path.read_bytes().startswith(b"these are not")  # left as it was


def test_a_path_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match=r"cannot create the directory of SQLite database .*a-file/aggregator.db"):
        open_store(f"sqlite:///{tmp_path}/a-file/aggregator.db")
    (tmp_path / "a-directory.db").mkdir()
    with pytest.raises(StoreError, match=r"cannot open SQLite database .*a-directory.db"):
        open_store(f"sqlite:///{tmp_path}/a-directory.db")


def test_a_store_used_before_migrate_raises_a_store_error(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/aggregator.db")
    try:
        with pytest.raises(StoreError, match="no such table"):
            store.write_batch(batch(1))
    finally:
        store.close()


def test_another_process_holding_the_write_lock_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.db"
    store = SqliteStore(path, busy_timeout_s=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        store.migrate()
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="database is locked"):
            store.write_batch(batch(1))
        other.execute("COMMIT")
        assert store.write_batch(batch(1)).stored  # the failed write left nothing behind
        assert store.acked_sequence("instance-a") == 1
    finally:
        other.close()
        store.close()
