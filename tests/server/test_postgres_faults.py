"""The PostgreSQL store when its connection dies in the middle of a transaction: the
half-done transaction is rolled back by PostgreSQL, the store reconnects and runs it
again, and what it wrote is there exactly once; past the reconnect window the caller
gets a StoreError telling the operator what to check."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from broker.errors import StoreError
from broker.server.store.base import WriteTxn
from broker.server.store.postgres import PostgresStore
from tests.pgserver import PgServer

pytestmark = [pytest.mark.postgres]


def _terminate(url: str, pid: int) -> None:
    """Kill one backend (the server process serving a connection), as an OOM kill or
    an operator's pg_terminate_backend would."""
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_backend_killed_mid_transaction_is_retried_once_on_a_new_connection(
        pg_database: str) -> None:
    """The first attempt writes, then its backend is killed before the commit: nothing of
    it is kept (PostgreSQL rolled it back), the store reconnects, the second attempt
    commits: the sequence advanced once and the record holds the second attempt's value."""
    attempts: list[int] = []
    with PostgresStore(pg_database, reconnect_s=30) as store:
        store.transact(lambda t: t.allocate_seq("r1"))

        def work(txn: WriteTxn) -> int:
            attempts.append(len(attempts) + 1)
            q = txn.allocate_seq("r1")
            txn.put_record("tasks", "a", {"attempt": len(attempts)})
            if len(attempts) == 1:
                assert store._conn is not None
                _terminate(pg_database, store._conn.info.backend_pid)
            return q

        reconnects = store.counters["reconnects"]
        q = store.transact(work)
        assert attempts == [1, 2]
        assert q == 2
        assert store.counters["reconnects"] == reconnects + 1
        with store.read() as txn:
            assert txn.scope_seq("r1") == 2
            assert txn.get_record("tasks", "a") == {"attempt": 2}


def test_server_gone_for_longer_than_the_reconnect_window_is_a_store_error(
        own_pg_server: PgServer) -> None:
    """PostgreSQL killed mid-transaction and not back: after `reconnect_s` the caller
    gets a StoreError saying the store was lost and to check that the server runs;
    nothing of the transaction is kept once it is back."""
    url = own_pg_server.create_database(f"f_{uuid.uuid4().hex[:8]}")
    with PostgresStore(url, reconnect_s=1.0, connect_timeout_s=2) as store:
        store.transact(lambda t: t.put_record("tasks", "kept", {"v": 1}))

        def work(txn: WriteTxn) -> Any:
            txn.put_record("tasks", "lost", {"v": 2})
            own_pg_server.kill()
            txn.put_record("tasks", "lost-2", {"v": 3})

        with capture_logs(), pytest.raises(StoreError, match=r"(?s)(lost|cannot connect to) "
                                           r"the PostgreSQL store at .*that the server runs"):
            store.transact(work)
        own_pg_server.start()
        with store.read() as txn:
            assert txn.get_record("tasks", "kept") == {"v": 1}
            assert txn.get_record("tasks", "lost") is None
            assert txn.get_record("tasks", "lost-2") is None
        store.transact(lambda t: t.put_record("tasks", "after", {"v": 4}))
        with store.read() as txn:
            assert txn.get_record("tasks", "after") == {"v": 4}
