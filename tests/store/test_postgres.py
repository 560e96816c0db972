"""PostgreSQL specifics: a dropped connection, two aggregators migrating at once, clear connection errors."""

from __future__ import annotations

import threading

import pytest

from collector.store import Store, StoreError, open_store
from collector.store.migrations import LATEST_VERSION
from tests.fakes.databases import terminate_connections
from tests.fakes.ports import free_port
from tests.store.builders import batch


def test_a_dropped_connection_is_replaced_and_the_next_write_works(postgres_url: str) -> None:
    store = open_store(postgres_url)
    try:
        store.migrate()
        assert store.write_batch(batch(1)).stored
        assert terminate_connections(postgres_url) >= 1  # the pool's idle connection, killed by the server
        result = store.write_batch(batch(2))
        assert (result.stored, result.acked_sequence) == (True, 2)
        assert terminate_connections(postgres_url) >= 1
        assert store.acked_sequence("instance-a") == 2  # reads reconnect too
    finally:
        store.close()


def test_two_aggregators_migrating_at_once_both_succeed(postgres_url: str) -> None:
    stores = [open_store(postgres_url) for _ in range(3)]
    versions: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def migrate(store: Store) -> None:
        start.wait()
        try:
            versions.append(store.migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(store,)) for store in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert versions == [LATEST_VERSION] * len(stores)
        assert stores[0].write_batch(batch(1)).stored
    finally:
        for store in stores:
            store.close()


def test_no_server_is_a_clear_error_without_the_password() -> None:
    url = f"postgresql://wattmeter:s3cret@127.0.0.1:{free_port()}/wattmeter"
    with pytest.raises(StoreError) as raised:
        open_store(url)
    message = str(raised.value)
    assert message.startswith("cannot connect to PostgreSQL at postgresql://wattmeter:***@127.0.0.1:")
    assert "check [storage] url" in message
    assert "s3cret" not in message


def test_a_wrong_password_is_a_clear_error(postgres_url: str) -> None:
    wrong = postgres_url.replace(":wattmeter_test@", ":not-the-password@", 1)
    if wrong == postgres_url:
        pytest.skip("the test server's URL has no password to get wrong")
    with pytest.raises(StoreError, match="password authentication failed") as raised:
        open_store(wrong)
    assert "not-the-password" not in str(raised.value)
