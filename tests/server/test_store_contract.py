"""The store contract: every backend must pass this suite (parametrised by `store`)."""

from __future__ import annotations

import dataclasses

import pytest

from broker.errors import StoreError
from broker.server.store.base import (
    MAX_DEAD_LETTER_RAW,
    CommandRow,
    ConflictRow,
    DeadLetter,
    DeadLetterLimits,
    DeadLetterStats,
    DeviceRow,
    LoginRemoval,
    Notice,
    OutcomeRow,
    ServerRow,
    Store,
    Tomb,
    WriteTxn,
    dead_letter_bytes,
    iter_all_index,
)


class Boom(Exception):
    pass


def _conflict(c: str = "tasks", k: str = "t-1", field: str = "address",
              open_: bool = True) -> ConflictRow:
    return ConflictRow(id=0, created_ms=5, c=c, k=k, s="r1", field=field,
                       entry={"winner": "x", "loser": "y"}, open=open_)


def _letter(raw: bytes = b"{}", code: str = "malformed") -> DeadLetter:
    return DeadLetter(id=0, t_ms=7, device="van-1", topic="up", code=code,
                      reason="bad", raw=raw)


def test_fresh_store_is_empty(store: Store) -> None:
    """A new store has no rows, no sequences and registry generation 0."""
    with store.read() as txn:
        assert txn.registry_generation() == 0
        assert txn.devices() == []
        assert txn.scope_seq("r1") == 0
        assert txn.scope_seqs() == {}
        assert txn.purge_horizon("r1") == 0
        assert txn.index_range("r1", 0, 10) == []
        assert txn.get_record("tasks", "t-1") is None
        assert txn.get_outcome("van-1", 1) is None
        assert set(txn.counts().values()) == {0}


def test_transaction_commits_and_returns_result(store: Store) -> None:
    """transact() commits every write of fn and returns fn's result."""
    def fn(txn: WriteTxn) -> int:
        txn.put_record("tasks", "t-1", {"a": 1})
        return txn.allocate_seq("r1")

    assert store.transact(fn) == 1
    with store.read() as txn:
        assert txn.get_record("tasks", "t-1") == {"a": 1}
        assert txn.scope_seq("r1") == 1


def test_exception_rolls_back_everything(store: Store) -> None:
    """An exception inside transact() leaves no trace of the transaction's writes."""
    def fn(txn: WriteTxn) -> None:
        txn.put_record("tasks", "t-1", {"a": 1})
        txn.allocate_seq("r1")
        txn.put_outcome("van-1", 1, OutcomeRow("tasks", "t-1", "r1", 1))
        txn.add_dead_letter(_letter())
        raise Boom

    with pytest.raises(Boom):
        store.transact(fn)
    with store.read() as txn:
        assert txn.get_record("tasks", "t-1") is None
        assert txn.scope_seq("r1") == 0
        assert txn.get_outcome("van-1", 1) is None
        assert txn.dead_letters(10) == []


def test_read_snapshot_is_consistent(store: Store) -> None:
    """A read transaction does not see writes committed after it began."""
    store.transact(lambda t: t.allocate_seq("r1"))
    with store.read() as txn:
        store.transact(lambda t: t.allocate_seq("r1"))
        assert txn.scope_seq("r1") == 1
    with store.read() as txn:
        assert txn.scope_seq("r1") == 2


def test_devices_and_registry_generation(store: Store) -> None:
    """Devices round-trip; bump_registry counts structural changes."""
    row = DeviceRow("van-1", ("r1", "r2"), created_ms=3, agent="w/0.1", sv=2, z=True,
                    online=True, cp={"r1": 4}, pend=2)

    def add(txn: WriteTxn) -> int:
        txn.put_device(row)
        txn.put_device(DeviceRow("van-2", ("r1",), enabled=False))
        return txn.bump_registry()

    assert store.transact(add) == 1
    with store.read() as txn:
        assert txn.get_device("van-1") == row
        assert [d.id for d in txn.devices()] == ["van-1", "van-2"]
        assert txn.registry_generation() == 1
    assert store.transact(lambda t: t.delete_device("van-2")) is True
    assert store.transact(lambda t: t.delete_device("van-2")) is False
    with store.read() as txn:
        assert txn.get_device("van-2") is None


def test_records_round_trip(store: Store) -> None:
    """Records are stored as JSON documents under (collection, key), any UTF-8 key."""
    state = {"f": {"name": "Grüße ✓", "n": 2**52, "x": None, "l": [1.5, True]}, "q": 3}
    store.transact(lambda t: t.put_record("tasks", "clé ✓/1", state))
    with store.read() as txn:
        assert txn.get_record("tasks", "clé ✓/1") == state
        assert txn.get_record("tasks", "clé ✓") is None
        assert txn.counts()["records"] == 1
    store.transact(lambda t: t.delete_record("tasks", "clé ✓/1"))
    with store.read() as txn:
        assert txn.get_record("tasks", "clé ✓/1") is None


def test_sequences_are_contiguous_per_scope(store: Store) -> None:
    """allocate_seq hands out 1, 2, 3, ... independently per scope."""
    def fn(txn: WriteTxn) -> list[int]:
        return [txn.allocate_seq(s) for s in ("a", "b", "a", "a", "a-1", "b")]

    assert store.transact(fn) == [1, 1, 2, 3, 1, 2]
    assert store.transact(lambda t: t.allocate_seq("a")) == 4
    with store.read() as txn:
        assert txn.scope_seqs() == {"a": 4, "a-1": 1, "b": 2}


def test_index_keeps_newest_version_in_q_order(store: Store) -> None:
    """index_move keeps one entry per record; index_range pages in q order per scope."""
    def fn(txn: WriteTxn) -> None:
        txn.index_move("r", 0, 1, "tasks", "a")
        txn.index_move("r", 0, 2, "tasks", "b")
        txn.index_move("r", 1, 3, "tasks", "a")
        txn.index_move("r-1", 0, 1, "tasks", "other")
        txn.index_move("r", 0, 300, "tasks", "c")

    store.transact(fn)
    with store.read() as txn:
        assert txn.index_range("r", 0, 10) == [(2, "tasks", "b"), (3, "tasks", "a"),
                                               (300, "tasks", "c")]
        assert txn.index_range("r", 2, 1) == [(3, "tasks", "a")]
        assert txn.index_range("r", 300, 10) == []
        assert txn.index_range("r-1", 0, 10) == [(1, "tasks", "other")]
        assert list(iter_all_index(txn, "r", page=1)) == txn.index_range("r", 0, 10)
    store.transact(lambda t: t.index_delete("r", 300))
    with store.read() as txn:
        assert [q for q, _, _ in txn.index_range("r", 0, 10)] == [2, 3]


def test_tombstones_and_horizon(store: Store) -> None:
    """Tombstones list oldest first per scope; the purge horizon is kept per scope."""
    def fn(txn: WriteTxn) -> None:
        txn.put_tomb(Tomb("r", 9, "tasks", "b", 90))
        txn.put_tomb(Tomb("r", 4, "tasks", "a", 40))
        txn.put_tomb(Tomb("r2", 1, "tasks", "z", 10))
        txn.set_purge_horizon("r", 3)

    store.transact(fn)
    with store.read() as txn:
        assert txn.tombs("r", 10) == [Tomb("r", 4, "tasks", "a", 40),
                                      Tomb("r", 9, "tasks", "b", 90)]
        assert txn.tombs("r", 1) == [Tomb("r", 4, "tasks", "a", 40)]
        assert txn.purge_horizon("r") == 3
        assert txn.purge_horizon("r2") == 0
    store.transact(lambda t: t.delete_tomb("r", 4))
    with store.read() as txn:
        assert [t.q for t in txn.tombs("r", 10)] == [9]


def test_outcomes_round_trip_and_delete_per_device(store: Store) -> None:
    """Outcomes keep applied (scope, q) or rejected (code, reason) and the content digest,
    per namespace (device, device/incarnation); deletion takes every namespace of one
    device and nothing of a device whose id merely starts the same."""
    applied = OutcomeRow("tasks", "t-1", scope="r1", q=12, d="0123456789abcdef")
    rejected = OutcomeRow("tasks", "t-2", code="rule_rejected", reason="stock < 0",
                          d="fedcba9876543210")
    legacy = OutcomeRow("tasks", "t-3", scope="r1", q=13)

    def fn(txn: WriteTxn) -> None:
        txn.put_outcome("van-1", 1, applied)
        txn.put_outcome("van-1", 2**53 - 1, rejected)
        txn.put_outcome("van-1/incarnationA1", 1, legacy)
        txn.put_outcome("van-10", 1, applied)
        txn.put_outcome("van-10/incarnationA1", 1, applied)

    store.transact(fn)
    with store.read() as txn:
        assert txn.get_outcome("van-1", 1) == applied
        assert txn.get_outcome("van-1", 1).applied  # type: ignore[union-attr]
        assert txn.get_outcome("van-1", 2**53 - 1) == rejected
        assert txn.get_outcome("van-1/incarnationA1", 1) == legacy
        assert not rejected.applied
    assert store.transact(lambda t: t.delete_outcomes("van-1")) == 3
    with store.read() as txn:
        assert txn.get_outcome("van-1", 1) is None
        assert txn.get_outcome("van-1/incarnationA1", 1) is None
        assert txn.get_outcome("van-10", 1) == applied
        assert txn.get_outcome("van-10/incarnationA1", 1) == applied


def test_conflicts_open_close_and_listing(store: Store) -> None:
    """Conflicts get increasing ids; open ones are indexed per field until closed."""
    def add(txn: WriteTxn) -> list[int]:
        return [txn.add_conflict(_conflict()), txn.add_conflict(_conflict(open_=False)),
                txn.add_conflict(_conflict(field="notes")),
                txn.add_conflict(_conflict())]

    ids = store.transact(add)
    assert ids == sorted(ids) and len(set(ids)) == 4
    with store.read() as txn:
        assert txn.open_conflicts_on("tasks", "t-1", "address") == [ids[0], ids[3]]
        assert txn.open_conflicts_on("tasks", "t-1", "addres") == []
        assert [r.id for r in txn.conflicts(open_only=True, limit=10)] == [ids[3], ids[2], ids[0]]
        assert [r.id for r in txn.conflicts(open_only=False, limit=2)] == [ids[3], ids[2]]
        row = txn.get_conflict(ids[0])
        assert row is not None and row.open and row.entry == {"winner": "x", "loser": "y"}
    assert store.transact(lambda t: t.close_conflict(ids[0], 99, "operator")) is True
    assert store.transact(lambda t: t.close_conflict(ids[0], 99, "operator")) is False
    assert store.transact(lambda t: t.close_conflict(12345, 99, "operator")) is False
    with store.read() as txn:
        row = txn.get_conflict(ids[0])
        assert row is not None and not row.open and row.closed_ms == 99
        assert row.resolution == "operator"
        assert txn.open_conflicts_on("tasks", "t-1", "address") == [ids[3]]
        assert txn.counts()["open_conflicts"] == 2


def test_dead_letters_truncate_and_list_newest_first(store: Store) -> None:
    """Dead letters keep at most 64 KiB of the raw payload and its full size."""
    big = b"x" * (MAX_DEAD_LETTER_RAW + 10)
    ids = store.transact(lambda t: [t.add_dead_letter(_letter(b"a")),
                                    t.add_dead_letter(_letter(big, "too_large"))])
    with store.read() as txn:
        letters = txn.dead_letters(10)
    assert [d.id for d in letters] == ids[::-1]
    assert letters[0].code == "too_large" and len(letters[0].raw) == MAX_DEAD_LETTER_RAW
    assert letters[0].size == len(big)
    assert letters[1].raw == b"a" and letters[1].device == "van-1"
    assert letters[1].topic == "up" and letters[1].t_ms == 7


def test_dead_letters_are_bounded(store_factory: object) -> None:
    """Beyond the configured maximum the oldest dead letters are dropped."""
    store = store_factory(max_dead_letters=3)  # type: ignore[operator]
    for i in range(5):
        store.transact(lambda t, i=i: t.add_dead_letter(_letter(str(i).encode())))
    with store.read() as txn:
        assert [d.raw for d in txn.dead_letters(10)] == [b"4", b"3", b"2"]


def _aged(i: int, t_ms: int, raw: bytes = b"r") -> DeadLetter:
    return DeadLetter(id=0, t_ms=t_ms, device="van-1", topic="up", code="malformed",
                      reason=f"bad {i}", raw=raw)


def test_dead_letter_stats_count_bytes_and_truncation(store: Store) -> None:
    """dead_letter_stats() reports the letters kept, their bytes, the truncated ones and
    the oldest time; nothing dropped yet."""
    big = b"x" * (MAX_DEAD_LETTER_RAW + 10)
    letters = [_aged(1, 50, b"a"), _aged(2, 60, big)]
    store.transact(lambda t: [t.add_dead_letter(d) for d in letters])
    with store.read() as txn:
        stats = txn.dead_letter_stats()
    kept = [letters[0], dataclasses.replace(letters[1], raw=big[:MAX_DEAD_LETTER_RAW])]
    assert stats == DeadLetterStats(count=2, bytes=sum(dead_letter_bytes(d) for d in kept),
                                    truncated=1, oldest_ms=50, dropped=0, dropped_bytes=0)


def test_dead_letters_are_bounded_by_bytes(store_factory: object) -> None:
    """Past max_bytes the oldest letters go (at the latest at the next trim), and the
    dropped letters and bytes are counted."""
    one = dead_letter_bytes(_aged(0, 10, b"x" * 1000))
    limits = DeadLetterLimits(max_count=1000, max_bytes=3 * one, max_age_ms=10**12)
    store = store_factory(dead_letters=limits)  # type: ignore[operator]
    for i in range(10):
        store.transact(lambda t, i=i: t.add_dead_letter(_aged(i, 10 + i, b"x" * 1000)))
    store.transact(lambda t: t.trim_dead_letters(100))
    with store.read() as txn:
        kept = txn.dead_letters(100)
        stats = txn.dead_letter_stats()
    assert [d.reason for d in kept] == ["bad 9", "bad 8", "bad 7"]
    assert stats.count == 3 and stats.bytes == 3 * one <= limits.max_bytes
    assert (stats.dropped, stats.dropped_bytes) == (7, 7 * one)


def test_dead_letters_are_bounded_by_age(store_factory: object) -> None:
    """A trim drops the letters older than max_age_ms, counting them, and only those."""
    limits = DeadLetterLimits(max_count=1000, max_bytes=1 << 30, max_age_ms=1000)
    store = store_factory(dead_letters=limits)  # type: ignore[operator]
    store.transact(lambda t: [t.add_dead_letter(_aged(i, 1000 + 100 * i)) for i in range(5)])
    assert store.transact(lambda t: t.trim_dead_letters(2250)) == 3
    assert store.transact(lambda t: t.trim_dead_letters(2250)) == 0
    with store.read() as txn:
        assert [d.t_ms for d in txn.dead_letters(10)] == [1400, 1300]
        stats = txn.dead_letter_stats()
    assert (stats.count, stats.oldest_ms, stats.dropped) == (2, 1300, 3)


def test_dead_letter_count_bound_is_kept_on_insert_and_counted(store_factory: object
                                                               ) -> None:
    """The count bound holds after every insert; the letters it drops are counted."""
    store = store_factory(  # type: ignore[operator]
        dead_letters=DeadLetterLimits(max_count=4, max_bytes=1 << 30, max_age_ms=10**12))
    for i in range(10):
        store.transact(lambda t, i=i: t.add_dead_letter(_aged(i, 10 + i)))
        with store.read() as txn:
            assert txn.dead_letter_stats().count <= 4
    with store.read() as txn:
        stats = txn.dead_letter_stats()
        assert [d.reason for d in txn.dead_letters(10)] == [f"bad {i}" for i in (9, 8, 7, 6)]
    assert stats.dropped == 6 and stats.dropped_bytes == 6 * dead_letter_bytes(_aged(0, 0))


def test_login_removals_one_per_device(store: Store) -> None:
    """A removed device's login deletion: one per id, oldest first, replaced in place
    (a failure noted), dropped once done; not a command of the id."""
    store.transact(lambda t: (t.put_login_removal(LoginRemoval("van-2", "r2", 20)),
                              t.put_login_removal(LoginRemoval("van-1", "r1", 10))))
    failed = LoginRemoval("van-2", "r2", 20, failed_ms=30, error="nodedown\x00",
                          hint="rabbitmqctl delete_user van-2")
    store.transact(lambda t: t.put_login_removal(failed))
    with store.read() as txn:
        assert [r.device for r in txn.login_removals()] == ["van-1", "van-2"]
        got = txn.get_login_removal("van-2")
        assert got is not None and (got.id, got.failed_ms) == ("r2", 30)
        assert got.hint == failed.hint and got.error.startswith("nodedown")
        assert txn.get_login_removal("van-3") is None and txn.commands() == []
    assert store.transact(lambda t: t.delete_login_removal("van-1"))
    assert not store.transact(lambda t: t.delete_login_removal("van-1"))
    with store.read() as txn:
        assert [r.id for r in txn.login_removals()] == ["r2"]


def test_servers_one_row_per_server_id(store: Store) -> None:
    """Merge-server liveness: none in a new store, one row per id, replaced in place
    (seen, then stopped), listed by id; a decommissioned server can be forgotten."""
    with store.read() as txn:
        assert txn.servers() == []
    a = ServerRow("server-a", "main", "1.2.3", started_ms=10, seen_ms=10)
    store.transact(lambda t: (t.put_server(ServerRow("server-b", "g2", "1.2.3", 5, 6)),
                              t.put_server(a)))
    # its broker link, which process it is, and its store refusing its writes
    cut_off = dataclasses.replace(a, seen_ms=30, broker_down_ms=25, proc="boot/4026531836/7/99",
                                  store_failing_ms=28, store_error="disk full: été")
    store.transact(lambda t: t.put_server(cut_off))
    with store.read() as txn:
        assert txn.servers()[0] == cut_off
    stopped = dataclasses.replace(a, seen_ms=40, stopped_ms=40)
    store.transact(lambda t: t.put_server(stopped))
    with store.read() as txn:
        assert txn.servers() == [stopped, ServerRow("server-b", "g2", "1.2.3", 5, 6)]
    assert store.transact(lambda t: t.delete_server("server-b"))
    assert not store.transact(lambda t: t.delete_server("server-b"))
    with store.read() as txn:
        assert [r.id for r in txn.servers()] == ["server-a"]


def test_commands_per_device(store: Store) -> None:
    """Commands are kept per device, oldest first, and updated in place."""
    def fn(txn: WriteTxn) -> None:
        txn.put_command(CommandRow("c2", "van-1", "ping", created_ms=2))
        txn.put_command(CommandRow("c1", "van-1", "wipe", created_ms=1))
        txn.put_command(CommandRow("c3", "van-10", "resync", created_ms=3))

    store.transact(fn)
    store.transact(lambda t: t.put_command(CommandRow("c2", "van-1", "ping", created_ms=2,
                                                      done_ms=5)))
    with store.read() as txn:
        rows = txn.commands("van-1")
        assert [(r.id, r.done_ms) for r in rows] == [("c1", 0), ("c2", 5)]
        assert len(txn.commands()) == 3
    assert store.transact(lambda t: t.delete_commands("van-1")) == 2
    with store.read() as txn:
        assert [r.id for r in txn.commands()] == ["c3"]


def test_notices_queue(store: Store) -> None:
    """Notices come back oldest first; ids are never reused after deletion."""
    first = store.transact(lambda t: t.add_notice(Notice(0, "r1", 5, {"c": "tasks"})))
    store.transact(lambda t: t.delete_notice(first))
    second = store.transact(lambda t: t.add_notice(Notice(0, "r1", 6, {"k": "t-1"})))
    assert second > first
    with store.read() as txn:
        assert txn.notices(10) == [Notice(second, "r1", 6, {"k": "t-1"})]


def test_info_reports_size_and_counts(store: Store) -> None:
    """info() names the backend, its size and the row counts."""
    store.transact(lambda t: t.put_record("tasks", "t-1", {"a": 1}))
    info = store.info()
    assert info.kind == store.kind
    assert info.size_bytes > 0
    assert info.counts["records"] == 1


def test_interrupt_ends_every_later_call_or_is_a_no_op(store: Store) -> None:
    """interrupt() is every store's: an interruptible store fails every call after it
    (the merge server's stop, past its grace); the others keep working."""
    store.transact(lambda t: t.put_record("tasks", "t-1", {"a": 1}))
    store.interrupt()
    if store.interruptible:
        with pytest.raises(StoreError):
            store.transact(lambda t: t.put_record("tasks", "t-2", {"a": 2}))
        with pytest.raises(StoreError), store.read():
            pass
        return
    store.transact(lambda t: t.put_record("tasks", "t-2", {"a": 2}))
    with store.read() as txn:
        assert txn.get_record("tasks", "t-1") == {"a": 1}
        assert txn.get_record("tasks", "t-2") == {"a": 2}


def test_lock_and_prefetch_hints_do_not_change_reads(store: Store) -> None:
    """lock_scopes and prefetch are hints: reads give the same answers, own writes too."""
    key = 'k "q" \\ {a,b} ✓'
    store.transact(lambda t: (t.put_record("tasks", key, {"s": "r1", "v": 1}),
                              t.index_move("r1", 0, t.allocate_seq("r1"), "tasks", key),
                              t.put_outcome("van-1", 1, OutcomeRow("tasks", key, "r1", 1))))

    def fn(txn: WriteTxn) -> list[object]:
        txn.put_outcome("van-1", 3, OutcomeRow("tasks", "new", code="invalid", reason="x"))
        txn.put_record("tasks", "mine", {"s": "r2", "v": 0})
        txn.lock_scopes(["r2", "r1", "r1"])
        txn.prefetch("van-1", [1, 2, 3, 99], [("tasks", key), ("tasks", "new"),
                                              ("tasks", "mine")])
        got: list[object] = [txn.get_outcome("van-1", n) for n in (1, 2, 3)]
        got += [txn.get_record("tasks", k) for k in (key, "new", "mine")]
        txn.put_record("tasks", "new", {"s": "r1", "v": 2})
        txn.index_move("r1", 0, txn.allocate_seq("r1"), "tasks", "new")
        txn.put_outcome("van-1", 2, OutcomeRow("tasks", "new", "r1", 2))
        got += [txn.get_record("tasks", "new"), txn.get_outcome("van-1", 2),
                txn.index_range("r1", 0, 10)]
        return got

    assert store.transact(fn) == [
        OutcomeRow("tasks", key, "r1", 1), None,
        OutcomeRow("tasks", "new", code="invalid", reason="x"),
        {"s": "r1", "v": 1}, None, {"s": "r2", "v": 0},
        {"s": "r1", "v": 2}, OutcomeRow("tasks", "new", "r1", 2),
        [(1, "tasks", key), (2, "tasks", "new")]]
    with store.read() as txn:
        assert txn.get_record("tasks", "new") == {"s": "r1", "v": 2}
        assert txn.get_outcome("van-1", 3) is not None
        assert txn.scope_seqs() == {"r1": 2}


def test_schema_guard_reads_the_generation_and_the_exclusive_lock_comes_first(
        store: Store) -> None:
    """guard_schema gives the registry generation (own bumps included); lock_schema
    is taken by publish/rollback before anything else."""
    store.transact(lambda t: t.bump_registry())
    with store.read() as txn:
        gen = txn.registry_generation()
    assert store.transact(lambda t: (t.guard_schema(), t.guard_schema())) == (gen, gen)

    def publish_like(txn: WriteTxn) -> int:
        txn.lock_schema()
        txn.lock_schema()  # again: a no-op
        return txn.bump_registry()

    assert store.transact(publish_like) == gen + 1
    assert store.transact(lambda t: t.guard_schema()) == gen + 1
