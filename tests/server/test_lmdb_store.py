"""LMDB-specific behaviour of the store: durability, map growth, format versioning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest

from broker.errors import StoreFormatError, StoreFullError
from broker.server.store.base import (
    CommandRow,
    DeadLetter,
    LoginRemoval,
    ServerRow,
    dead_letter_bytes,
)
from broker.server.store.lmdb_store import LmdbStore


def test_data_survives_reopen(tmp_path: Path) -> None:
    """What a committed transaction wrote is there after closing and reopening."""
    with LmdbStore(tmp_path) as store:
        store.transact(lambda t: (t.put_record("tasks", "t-1", {"a": 1}),
                                  t.allocate_seq("r1")))
    with LmdbStore(tmp_path) as store, store.read() as txn:
        assert txn.get_record("tasks", "t-1") == {"a": 1}
        assert txn.scope_seq("r1") == 1


def test_map_grows_when_full(tmp_path: Path) -> None:
    """A transaction that does not fit the map grows it and commits (no lost write)."""
    with LmdbStore(tmp_path, map_size_mb=1, max_map_size_mb=64) as store:
        blob = {"x": "y" * 200_000}

        def fill(t: object) -> None:
            for i in range(20):
                t.put_record("tasks", f"k{i}", blob)  # type: ignore[attr-defined]

        store.transact(fill)
        assert store.info().capacity_bytes > 1024 * 1024
        with store.read() as txn:
            assert txn.counts()["records"] == 20


def test_full_at_maximum_raises_store_full(tmp_path: Path) -> None:
    """Past max_map_size_mb the store refuses with an actionable StoreFullError."""
    with LmdbStore(tmp_path, map_size_mb=1, max_map_size_mb=2) as store:
        blob = {"x": "y" * 200_000}

        def fill(t: object) -> None:
            for i in range(30):
                t.put_record("tasks", f"k{i}", blob)  # type: ignore[attr-defined]

        with pytest.raises(StoreFullError, match="max_map_size_mb"):
            store.transact(fill)
        with store.read() as txn:
            assert txn.counts()["records"] == 0


def test_other_format_is_refused(tmp_path: Path) -> None:
    """A store written in another format version is not opened."""
    LmdbStore(tmp_path).close()
    env = lmdb.open(str(tmp_path / "store"), max_dbs=20)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", b"99", db=meta)
    env.close()
    with pytest.raises(StoreFormatError, match="format 99"):
        LmdbStore(tmp_path)


def test_follows_a_map_grown_by_another_process(tmp_path: Path) -> None:
    """When another process (the operator CLI) grew the map, this one adopts the size."""
    store = LmdbStore(tmp_path, map_size_mb=1, max_map_size_mb=64)
    try:
        script = textwrap.dedent(f"""
            from broker.server.store.lmdb_store import LmdbStore
            s = LmdbStore({str(tmp_path)!r}, map_size_mb=1, max_map_size_mb=64)
            s.transact(lambda t: [t.put_record("tasks", f"k{{i}}", {{"x": "y" * 200000}})
                                  for i in range(20)])
            s.close()
        """)
        subprocess.run([sys.executable, "-c", script], check=True,
                       cwd=Path(__file__).parents[2])
        store.transact(lambda t: t.put_record("tasks", "mine", {"a": 1}))
        with store.read() as txn:
            assert txn.counts()["records"] == 21
    finally:
        store.close()


def test_dead_letters_of_a_store_without_totals_are_measured(tmp_path: Path) -> None:
    """A store written before the dead-letter totals were kept gets them counted from
    its letters, then keeps them up to date."""
    old = DeadLetter(0, 5, "van-1", "up", "malformed", "bad", b"abc", 9)
    with LmdbStore(tmp_path) as store:
        store.transact(lambda t: t.add_dead_letter(old))
    env = lmdb.open(str(tmp_path / "store"), max_dbs=20)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        for key in (b"dl:bytes", b"dl:truncated"):
            assert txn.delete(key, db=meta)
    env.close()
    with LmdbStore(tmp_path) as store:
        with store.read() as txn:
            stats = txn.dead_letter_stats()
        assert (stats.count, stats.bytes, stats.truncated) == (1, dead_letter_bytes(old), 1)
        store.transact(lambda t: t.add_dead_letter(old))
        with store.read() as txn:
            assert txn.dead_letter_stats().bytes == 2 * dead_letter_bytes(old)


def test_a_format_1_store_moves_its_login_removals_to_their_table(tmp_path: Path) -> None:
    """Format 1 kept a pending login deletion as a `remove_login` command row: opened by
    this version, the rows move to the removals table (failure included), the other
    commands stay, and the store says format 2."""
    with LmdbStore(tmp_path) as store:
        store.transact(lambda t: (
            t.put_command(CommandRow("remove_login-1", "van-1", "remove_login", {
                "failed_ms": 7, "error": "nodedown", "hint": "rabbitmqctl delete_user van-1"},
                created_ms=5)),
            t.put_command(CommandRow("remove_login-2", "van-2", "remove_login", {},
                                     created_ms=6)),
            t.put_command(CommandRow("c-1", "van-3", "ping", created_ms=1))))
    env = lmdb.open(str(tmp_path / "store"), max_dbs=20)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"1", db=env.open_db(b"meta", txn=txn))
        txn.drop(env.open_db(b"login_removals", txn=txn))  # not in format 1
    env.close()
    with LmdbStore(tmp_path) as store, store.read() as txn:
        assert txn.login_removals() == [
            LoginRemoval("van-1", "remove_login-1", 5, 7, "nodedown",
                         "rabbitmqctl delete_user van-1"),
            LoginRemoval("van-2", "remove_login-2", 6)]
        assert [c.id for c in txn.commands()] == ["c-1"]
    env = lmdb.open(str(tmp_path / "store"), max_dbs=20)
    with env.begin() as txn:
        assert txn.get(b"format", db=env.open_db(b"meta", txn=txn)) == b"2"
    env.close()


def test_a_format_2_store_without_the_servers_table_gets_it_empty(tmp_path: Path) -> None:
    """The servers table came without a format bump: a format 2 store written before it
    opens, reads no servers, and takes a server row; the format stays 2."""
    with LmdbStore(tmp_path) as store:
        store.transact(lambda t: t.put_record("tasks", "t-1", {"a": 1}))
    env = lmdb.open(str(tmp_path / "store"), max_dbs=20)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"servers", txn=txn))  # as a store written before it
    env.close()
    with LmdbStore(tmp_path) as store:
        with store.read() as txn:
            assert txn.servers() == [] and txn.get_record("tasks", "t-1") == {"a": 1}
        store.transact(lambda t: t.put_server(ServerRow("server-1", "main", "1", 5, 6)))
        with store.read() as txn:
            assert [r.id for r in txn.servers()] == ["server-1"]
    env = lmdb.open(str(tmp_path / "store"), max_dbs=20)
    with env.begin() as txn:
        assert txn.get(b"format", db=env.open_db(b"meta", txn=txn)) == b"2"
    env.close()
