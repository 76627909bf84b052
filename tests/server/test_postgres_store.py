"""PostgreSQL-specific behaviour of the store: migrations, connection handling, and several
merge consumers (engines in separate processes) over one database.

The shared contract (tests/server/test_store_contract.py) and the engine tests already
run against PostgreSQL; these tests cover what only a shared database can get wrong:
concurrent first opens, transactions of two consumers interleaving, a server restart or
crash in the middle of the stream.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.errors import StoreError, StoreFormatError
from broker.server.engine import Engine
from broker.server.registry import add_device
from broker.server.store import open_store
from broker.server.store.base import (
    DeadLetter,
    DeviceRow,
    LoginRemoval,
    OutcomeRow,
    ServerRow,
    WriteTxn,
    dead_letter_bytes,
    iter_all_index,
)
from broker.server.store.postgres import (
    ADVISORY_LOCK,
    SCHEMA,
    PgWriteTxn,
    PostgresStore,
    migrations,
)
from tests.helpers import free_port, wait_until
from tests.pgserver import PgServer, unavailable_reason
from tests.server.helpers import (
    CATALOG,
    T0,
    FakeTime,
    by_device,
    changes,
    config,
    hp,
    oks,
    rejections,
)
from waystation import merge
from waystation.config import ServerConfig

_UNAVAILABLE = unavailable_reason()
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or ""),
]

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def url(pg_database: str) -> str:
    """A fresh, empty database (no schema yet)."""
    return pg_database


@pytest.fixture
def store(url: str) -> Iterator[PostgresStore]:
    """A PostgresStore on a fresh database."""
    s = PostgresStore(url)
    yield s
    s.close()


def _sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on its own autocommit connection; the rows it returns."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def _on_pid(url: str, pid: int) -> Callable[[], bool]:
    """A predicate: the backend `pid` is waiting for a lock."""
    def waiting() -> bool:
        rows = _sql(url, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
        return bool(rows) and rows[0][0] == "Lock"
    return waiting


# ---------------------------------------------------------------------------- migrations


def test_migrations_apply_once_and_reopen_is_idempotent(url: str) -> None:
    """Opening creates the schema and records each migration once; reopening changes nothing."""
    with PostgresStore(url) as first:
        first.transact(lambda t: t.put_record("tasks", "t-1", {"a": 1}))
        assert first.schema_version() == len(migrations())
    with PostgresStore(url) as again, again.read() as txn:
        assert txn.get_record("tasks", "t-1") == {"a": 1}
    rows = _sql(url, f"SELECT version, name FROM {SCHEMA}.schema_migrations ORDER BY version")
    assert rows == [(m.version, m.name) for m in migrations()]


def _open_and_report(url: str, out: Any) -> None:
    """Process body: open the store (migrating if needed) and report the outcome."""
    try:
        PostgresStore(url).close()
        out.put("ok")
    except Exception as exc:  # reported to the test
        out.put(f"{type(exc).__name__}: {exc}")


def test_concurrent_first_opens_migrate_once(url: str) -> None:
    """Two processes opening a fresh database at once: one migrates, the other waits."""
    out = SPAWN.Queue()
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK,))
        procs = [SPAWN.Process(target=_open_and_report, args=(url, out)) for _ in range(2)]
        for proc in procs:
            proc.start()
        # both are now blocked on the migration lock, nothing created yet
        wait_until(lambda: _sql(url, "SELECT count(*) FROM pg_locks WHERE "
                                     "locktype = 'advisory' AND NOT granted")[0][0] == 2,
                   60, message="both openers waiting for the advisory lock")
        assert _sql(url, "SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                    (SCHEMA,)) == [(0,)]
        holder.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK,))
        results = sorted(out.get(timeout=60) for _ in procs)
        for proc in procs:
            proc.join(30)
    assert results == ["ok", "ok"]
    assert _sql(url, f"SELECT count(*) FROM {SCHEMA}.schema_migrations") == [
        (len(migrations()),)]


def test_newer_schema_is_refused(url: str) -> None:
    """A database migrated by a newer Waystation is not opened, with a clear error."""
    PostgresStore(url).close()
    newer = len(migrations()) + 1
    _sql(url, f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES (%s, 'future')",
         (newer,))
    with pytest.raises(StoreFormatError, match=f"schema version {newer}, newer than"):
        PostgresStore(url)


def test_dead_letters_of_a_version_1_database_are_measured_after_migration(url: str
                                                                            ) -> None:
    """Letters kept before migration 2 get their byte count, and count in the bounds."""
    first = migrations()[0]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"SET search_path = {SCHEMA}")
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                     "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(first.sql.encode())
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, %s)",
                     (first.name,))
        conn.execute("INSERT INTO dead_letters (t_ms, device, topic, code, reason, raw, "
                     "size) VALUES (5, 'van-1', 'up', 'malformed', 'bad', 'abc', 9)")
    old = DeadLetter(0, 5, "van-1", "up", "malformed", "bad", b"abc", 9)
    with PostgresStore(url) as store:
        assert store.schema_version() == len(migrations())
        with store.read() as txn:
            stats = txn.dead_letter_stats()
        assert (stats.count, stats.bytes, stats.truncated) == (1, dead_letter_bytes(old), 1)


def _database_at(url: str, version: int) -> None:
    """A database as migrations 1 to `version` left it (an older server's)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"SET search_path = {SCHEMA}")
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                     "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for m in migrations()[:version]:
            conn.execute(m.sql.encode())
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                         (m.version, m.name))


def test_login_removals_kept_as_commands_move_to_their_table(url: str) -> None:
    """A version 4 database kept a pending login deletion as a `remove_login` command
    row: migration 5 moves it (failure included) to the removals table; other commands
    stay."""
    _database_at(url, 4)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {SCHEMA}")
        for dev, cid, cmd, args, created in (
                ("van-1", "remove_login-1", "remove_login",
                 '{"failed_ms": 7, "error": "nodedown", "hint": "rabbitmqctl delete_user"}', 5),
                ("van-2", "remove_login-2", "remove_login", "{}", 6),
                ("van-3", "c-1", "ping", "{}", 1)):
            conn.execute("INSERT INTO commands (dev, id, cmd, args, created_ms) "
                         "VALUES (%s, %s, %s, %s::jsonb, %s)", (dev, cid, cmd, args, created))
    with PostgresStore(url) as store, store.read() as txn:
        assert txn.login_removals() == [
            LoginRemoval("van-1", "remove_login-1", 5, 7, "nodedown", "rabbitmqctl delete_user"),
            LoginRemoval("van-2", "remove_login-2", 6)]
        assert [c.id for c in txn.commands()] == ["c-1"]


def test_a_version_5_database_gets_the_servers_table(url: str) -> None:
    """Migration 6 adds the merge servers' liveness table to a version 5 database:
    empty, then one row per server id."""
    _database_at(url, 5)
    with PostgresStore(url) as store:
        assert store.schema_version() >= 6
        with store.read() as txn:
            assert txn.servers() == []
        row = ServerRow("server-1", "main", "1.2.3", 5, 6)
        store.transact(lambda t: t.put_server(row))
        with store.read() as txn:
            assert txn.servers() == [row]


def test_role_without_create_rights_uses_a_prepared_database(url: str) -> None:
    """Once the owner migrated it, a role with only data privileges opens and writes."""
    PostgresStore(url).close()
    role = f"ws_app_{uuid.uuid4().hex[:8]}"
    _sql(url, f"CREATE ROLE {role} LOGIN")
    try:
        for grant in (f"GRANT USAGE ON SCHEMA {SCHEMA} TO {role}",
                      f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} "
                      f"TO {role}",
                      f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {SCHEMA} TO {role}"):
            _sql(url, grant)
        with PostgresStore(url.replace("postgres@", f"{role}@")) as store:
            def fn(txn: WriteTxn) -> None:
                txn.lock_scopes(["r1"])
                for i in range(100):  # enough rows for the COPY and staging paths
                    key = f"t-{i}"
                    old = txn.get_record("tasks", key)
                    q = txn.allocate_seq("r1")
                    txn.put_record("tasks", key, {"s": "r1", "q": q})
                    txn.index_move("r1", old["q"] if old else 0, q, "tasks", key)
            store.transact(fn)  # creates (COPY)
            store.transact(fn)  # updates (staging table)
            with store.read() as txn:
                assert txn.counts()["records"] == 100 and txn.scope_seq("r1") == 200
                assert [q for q, _, _ in txn.index_range("r1", 0, 500)] == list(range(101, 201))
    finally:
        _sql(url, f"DROP OWNED BY {role}")
        _sql(url, f"DROP ROLE {role}")


def test_open_store_uses_the_configured_url(url: str, tmp_path: Path) -> None:
    """store.kind = "postgres" opens the database named by store.url."""
    cfg = ServerConfig.model_validate({"data_dir": str(tmp_path),
                                       "store": {"kind": "postgres", "url": url}})
    store = open_store(cfg)
    try:
        assert isinstance(store, PostgresStore) and store.info().kind == "postgres"
    finally:
        store.close()


# ---------------------------------------------------------------------------- errors


def test_unreachable_server_error_names_it_without_the_password() -> None:
    """Cannot connect: the error names host, port and database, never the password."""
    port = free_port()
    with pytest.raises(StoreError) as info:
        PostgresStore(f"postgresql://ws:hunter2@127.0.0.1:{port}/fleet", connect_timeout_s=2)
    text = str(info.value)
    assert f"127.0.0.1:{port}/fleet" in text and "hunter2" not in text
    assert "check store.url" in text


def test_location_hides_the_password(pg_server: PgServer, url: str) -> None:
    """info().location is the URL without its password."""
    with_password = url.replace("postgres@", "postgres:s3cret@")
    with PostgresStore(with_password) as store:
        assert "s3cret" not in store.info().location
        assert store.info().location.endswith(f":{pg_server.port}/{url.rsplit('/', 1)[1]}")


def test_other_database_errors_become_store_errors(store: PostgresStore, url: str) -> None:
    """A refusal that retrying cannot fix is a StoreError with the SQLSTATE, not a hang."""
    _sql(url, f"ALTER TABLE {SCHEMA}.records ADD CONSTRAINT no_k CHECK (k <> 'forbidden')")
    with pytest.raises(StoreError, match=r"failed \(23514\)"):
        store.transact(lambda t: t.put_record("tasks", "forbidden", {"a": 1}))
    store.transact(lambda t: t.put_record("tasks", "fine", {"a": 1}))  # still usable


def test_text_with_nul_is_kept_readable(store: PostgresStore) -> None:
    """Text PostgreSQL cannot hold (NUL) is escaped rather than failing the transaction."""
    store.transact(lambda t: t.add_dead_letter(DeadLetter(0, 1, "van\x00-1", "up", "invalid",
                                                          "bad \x00 byte", b"\x00raw")))
    with store.read() as txn:
        (letter,) = txn.dead_letters(5)
    assert letter.reason == "bad \\x00 byte" and letter.raw == b"\x00raw"


# ---------------------------------------------------------------------------- two writers


def test_same_change_committed_elsewhere_is_retried_as_duplicate(url: str,
                                                                 store: PostgresStore) -> None:
    """Another consumer commits the same outcome mid-transaction: unique key, retry, duplicate."""
    other = PostgresStore(url)
    attempts: list[OutcomeRow | None] = []

    def fn(txn: WriteTxn) -> str:
        prior = txn.get_outcome("van-1", 7)
        attempts.append(prior)
        if prior is not None:
            return "duplicate"
        if len(attempts) == 1:  # the other consumer wins the race, right now
            other.transact(lambda t: t.put_outcome("van-1", 7, OutcomeRow("tasks", "a", "r1", 1)))
        txn.put_outcome("van-1", 7, OutcomeRow("tasks", "a", "r1", 2))
        return "applied"

    try:
        assert store.transact(fn) == "duplicate"
    finally:
        other.close()
    assert attempts == [None, OutcomeRow("tasks", "a", "r1", 1)]
    assert store.counters["retries"] == 1


def test_same_new_record_created_elsewhere_is_retried(url: str, store: PostgresStore) -> None:
    """Two consumers create one key: the loser's insert fails, its retry reads the record."""
    other = PostgresStore(url)
    seen: list[object] = []

    def fn(txn: WriteTxn) -> None:
        seen.append(txn.get_record("tasks", "t-1"))
        if len(seen) == 1:
            other.transact(lambda t: t.put_record("tasks", "t-1", {"s": "r2", "by": "other"}))
        if seen[-1] is None:
            txn.put_record("tasks", "t-1", {"s": "r1", "by": "me"})

    try:
        store.transact(fn)
    finally:
        other.close()
    assert seen == [None, {"s": "r2", "by": "other"}]
    with store.read() as txn:
        assert txn.get_record("tasks", "t-1") == {"s": "r2", "by": "other"}


def test_device_updates_of_two_consumers_merge(url: str, store: PostgresStore) -> None:
    """Fields written by concurrent transactions to one device row all survive."""
    store.transact(lambda t: t.put_device(DeviceRow("van-1", ("r1",))))
    other = PostgresStore(url)

    def fn(txn: WriteTxn) -> None:
        row = txn.get_device("van-1")
        assert row is not None
        other.transact(lambda t: t.put_device(DeviceRow("van-1", ("r1",), last_seen_ms=5)))
        txn.put_device(DeviceRow("van-1", ("r1",), cp={"r1": 3}))

    try:
        store.transact(fn)
    finally:
        other.close()
    with store.read() as txn:
        assert txn.get_device("van-1") == DeviceRow("van-1", ("r1",), last_seen_ms=5,
                                                    cp={"r1": 3})


def test_record_read_waits_for_the_scope_writer(url: str, store: PostgresStore) -> None:
    """get_record in a write transaction locks the record's scope, so it reads the latest."""
    store.transact(lambda t: t.put_record("tasks", "t-1", {"s": "r1", "v": 1}))
    other = PostgresStore(url)
    holding, release = threading.Event(), threading.Event()
    pid: list[int] = []

    def writer(txn: WriteTxn) -> None:
        txn.lock_scopes(["r1"])
        txn.put_record("tasks", "t-1", {"s": "r1", "v": 2})
        holding.set()
        assert release.wait(30)

    thread = threading.Thread(target=other.transact, args=(writer,))
    thread.start()
    try:
        assert holding.wait(30)

        def reader(txn: WriteTxn) -> object:
            assert isinstance(txn, PgWriteTxn)
            pid.append(txn._conn.info.backend_pid)
            return txn.get_record("tasks", "t-1")

        result: list[object] = []
        rthread = threading.Thread(target=lambda: result.append(store.transact(reader)))
        rthread.start()
        wait_until(lambda: pid and _on_pid(url, pid[0])(), 30,
                   message="the reader waiting for the scope lock")
        release.set()
        rthread.join(30)
        assert result == [{"s": "r1", "v": 2}]
    finally:
        release.set()
        thread.join(30)
        other.close()


def test_scope_locks_taken_out_of_order_do_not_deadlock(url: str,
                                                        store: PostgresStore) -> None:
    """Two transactions locking two scopes in opposite orders both commit, via one rerun."""
    other = PostgresStore(url)
    a_has_b, b_waiting = threading.Event(), threading.Event()
    b_pid: list[int] = []
    runs: list[str] = []

    def first(txn: WriteTxn) -> None:  # b, then a (out of order)
        runs.append("first")
        txn.lock_scopes(["b"])
        if len(runs) == 1:
            a_has_b.set()
            assert b_waiting.wait(30)
        txn.allocate_seq("b")
        txn.lock_scopes(["a"])
        txn.allocate_seq("a")

    def second(txn: WriteTxn) -> None:  # a, then b
        assert isinstance(txn, PgWriteTxn)
        b_pid.append(txn._conn.info.backend_pid)
        txn.lock_scopes(["a"])
        txn.allocate_seq("a")
        txn.lock_scopes(["b"])
        txn.allocate_seq("b")

    thread = threading.Thread(target=store.transact, args=(first,))
    thread.start()
    try:
        assert a_has_b.wait(30)
        sthread = threading.Thread(target=other.transact, args=(second,))
        sthread.start()
        wait_until(lambda: b_pid and _on_pid(url, b_pid[0])(), 30,
                   message="the second transaction waiting for scope b")
        b_waiting.set()
        sthread.join(30)
        thread.join(30)
    finally:
        b_waiting.set()
        other.close()
    assert runs == ["first", "first"] and store.counters["reorders"] == 1
    with store.read() as txn:
        assert txn.scope_seqs() == {"a": 2, "b": 2}


# ---------------------------------------------------------------------------- engines in processes

DEVS = [f"van-{i}" for i in range(6)]
SCOPES = ["s-a", "s-b", "s-c"]


def _device_scopes(i: int) -> list[str]:
    return [SCOPES[i % 3], SCOPES[(i + 1) % 3]]


def _workload(seed: int, per_device: int) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """Every device's changes in batches, and the counter total each record must reach."""
    rng = random.Random(seed)
    batches: list[tuple[str, bytes]] = []
    totals: dict[str, int] = {}
    for i, dev in enumerate(DEVS):
        n = 1
        while n <= per_device:
            size = rng.randrange(1, 25)
            chs = []
            for m in range(n, min(n + size, per_device + 1)):
                scope = rng.choice(_device_scopes(i))
                key = f"{scope}-k{rng.randrange(12)}"
                inc = rng.randrange(1, 9)
                totals[key] = totals.get(key, 0) + inc
                chs.append({"n": m, "h": hp(T0 + m * 10 + i, m), "c": "tasks", "k": key,
                            "s": scope, "op": "put", "f": {"route": scope},
                            "i": {"attempts": inc}})
            batches.append((dev, changes(dev, chs)))
            n += size
    return batches, totals


def _groups(batches: list[tuple[str, bytes]], seed: int) -> list[list[tuple[str, bytes]]]:
    """All batches, a third of them twice, shuffled, in groups of 1 to 8 messages."""
    rng = random.Random(seed)
    msgs = batches + rng.sample(batches, len(batches) // 3)
    rng.shuffle(msgs)
    out = []
    while msgs:
        size = rng.randrange(1, 9)
        out.append(msgs[:size])
        msgs = msgs[size:]
    return out


def _engine_worker(url: str, data_dir: str, groups: list[list[tuple[str, bytes]]],
                   start: Any, out: Any) -> None:
    """Process body: one merge consumer applying `groups`; reports every ack and refusal."""
    store = PostgresStore(url)
    try:
        engine = Engine(store, CATALOG, config(Path(data_dir)), FakeTime())
        acks: list[tuple[str, int, str, int]] = []
        refused: list[tuple[str, Any]] = []
        start.wait()
        for group in groups:
            for dev, msgs in by_device(engine.handle_many(group)).items():
                acks.extend((dev, n, s, q) for n, s, q in oks(msgs))
                refused.extend((dev, r) for r in rejections(msgs))
        out.put({"acks": acks, "refused": refused, "applied": engine.counters["applied"],
                 "store": dict(store.counters)})
    except BaseException as exc:  # reported to the test
        out.put({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        store.close()


class _Watcher(threading.Thread):
    """Polls read snapshots while the consumers run: in every snapshot, each scope's
    applied changes are exactly q = 1..seq (no q+1 visible before q), and no log entry
    ever appears at or below a q a previous snapshot had reached."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.store = PostgresStore(url)
        self.stop = threading.Event()
        self.polls = 0
        self.applied: list[int] = []  # changes in, per snapshot
        self.problems: list[str] = []

    def run(self) -> None:
        last: dict[str, tuple[int, set[tuple[int, str, str]]]] = {}
        try:
            while not self.stop.is_set():
                self._poll(last)
        except Exception as exc:  # reported by the test
            self.problems.append(f"watcher failed: {exc!r}")
        finally:
            self.store.close()

    def _poll(self, last: dict[str, tuple[int, set[tuple[int, str, str]]]]) -> None:
        applied = 0
        with self.store.read() as txn:
            for scope in SCOPES:
                seq = txn.scope_seq(scope)
                entries = set(iter_all_index(txn, scope, page=50))
                count, top = txn._one(  # type: ignore[attr-defined]
                    "SELECT count(*), coalesce(max(q), 0) FROM outcomes "
                    "WHERE scope = %s AND code = ''", (scope,))
                if not count == top == seq:
                    self.problems.append(f"{scope}: {count} applied, max q {top}, seq {seq}")
                if entries and max(q for q, _, _ in entries) != seq:
                    self.problems.append(f"{scope}: newest log entry is not seq {seq}")
                prev_seq, prev = last.get(scope, (0, set()))
                late = {e for e in entries if e[0] <= prev_seq} - prev
                if late:
                    self.problems.append(f"{scope}: {sorted(late)} appeared at or below "
                                         f"{prev_seq}, after a snapshot had reached it")
                last[scope] = (seq, entries)
                applied += seq
        self.polls += 1
        self.applied.append(applied)


def test_two_engine_processes_apply_every_change_exactly_once(url: str,
                                                              tmp_path: Path) -> None:
    """Two consumers in two processes, overlapping duplicated batches: exactly once, gapless."""
    with PostgresStore(url) as setup:
        for i, dev in enumerate(DEVS):
            add_device(setup, dev, _device_scopes(i), T0)
    batches, totals = _workload(seed=1, per_device=150)
    total = 6 * 150
    start, out = SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_engine_worker,
                           args=(url, str(tmp_path / f"e{w}"), _groups(batches, 10 + w), start,
                                 out)) for w in range(2)]
    for proc in procs:
        proc.start()
    watcher = _Watcher(url)
    watcher.start()
    try:
        start.set()
        results = [out.get(timeout=240) for _ in procs]
    finally:
        watcher.stop.set()
        watcher.join(60)
        for proc in procs:
            proc.join(60)
    assert all("error" not in r for r in results), results
    assert watcher.problems == []
    # the watcher saw the stream in progress, not only before and after it
    assert any(0 < n < total for n in watcher.applied), watcher.applied[-5:]
    # every change acked by both consumers (each saw every batch), always with one (scope, q)
    answers: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for r in results:
        assert r["refused"] == []
        for dev, n, scope, q in r["acks"]:
            answers.setdefault((dev, n), set()).add((scope, q))
    assert len(answers) == total and all(len(a) == 1 for a in answers.values())
    assert sum(r["applied"] for r in results) == total
    # per scope: q = 1..seq, each used by exactly one change
    by_scope: dict[str, list[int]] = {}
    for ((_scope, q),) in answers.values():
        by_scope.setdefault(_scope, []).append(q)
    with PostgresStore(url) as check, check.read() as txn:
        for scope, qs in by_scope.items():
            assert sorted(qs) == list(range(1, txn.scope_seq(scope) + 1))
        # every increment counted once
        for key, expected in totals.items():
            raw = txn.get_record("tasks", key)
            assert raw is not None and merge.from_json(raw).value("attempts") == expected
        assert txn.counts()["outcomes"] == total


# ---------------------------------------------------------------------------- server restarts


def _batch(dev: str, first: int, count: int) -> bytes:
    return changes(dev, [{"n": n, "h": hp(T0 + n, n), "c": "tasks", "k": f"k{n % 7}",
                          "s": "r1", "op": "put", "f": {"route": "r1"},
                          "i": {"attempts": 1}} for n in range(first, first + count)])


def test_engine_survives_postgres_restarts_and_crashes(own_pg_server: PgServer,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Restart between groups, kill -9 inside a transaction, a lost COMMIT reply, an outage
    longer than the retry window: every change ends applied exactly once, q gapless."""
    url = own_pg_server.create_database("restarts")
    store = PostgresStore(url, reconnect_s=60)
    try:
        add_device(store, "van-1", ["r1"], T0)
        engine = Engine(store, CATALOG, config(tmp_path), FakeTime())
        acks: dict[int, int] = {}

        def feed(first: int, count: int = 20) -> list[dict[str, Any]]:
            msgs = by_device(engine.handle_up("van-1", _batch("van-1", first, count)))["van-1"]
            for n, _s, q in oks(msgs):
                assert acks.setdefault(n, q) == q  # a repeat is answered with the same q
            return rejections(msgs)

        assert feed(1) == []
        # 1. clean restart between groups: the next group reconnects
        own_pg_server.restart()
        assert feed(21) == []
        # 2. kill -9 while a group's writes are being sent: its transaction is rerun
        real_send = PgWriteTxn._send
        crashes: list[int] = []

        def crashing_send(txn: PgWriteTxn) -> None:
            if not crashes:
                crashes.append(1)
                own_pg_server.kill()
                own_pg_server.start()
            real_send(txn)

        monkeypatch.setattr(PgWriteTxn, "_send", crashing_send)
        assert feed(41) == [] and crashes == [1]
        monkeypatch.setattr(PgWriteTxn, "_send", real_send)
        # 3. the COMMIT succeeded but its reply was lost: the rerun finds the outcomes
        real_commit = psycopg.Connection.commit
        lost: list[int] = []

        def commit_then_crash(conn: psycopg.Connection[Any]) -> None:
            real_commit(conn)
            if not lost and not conn.read_only:
                lost.append(1)
                own_pg_server.kill()
                own_pg_server.start()
                raise psycopg.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(psycopg.Connection, "commit", commit_then_crash)
        assert feed(61) == [] and lost == [1]
        monkeypatch.setattr(psycopg.Connection, "commit", real_commit)
        # 4. down for longer than the retry window: a clean transient refusal, then a resend
        store.reconnect_s = 0.5
        own_pg_server.stop()
        refused = feed(81)
        assert {(r["code"], r["perm"]) for r in refused} == {("server_error", False)}
        assert len(refused) == 20
        own_pg_server.start()
        assert feed(81) == []
        assert feed(61) == []  # an old resend is still a duplicate
        with store.read() as txn:
            assert txn.scope_seq("r1") == 100
            assert sorted(acks.values()) == list(range(1, 101))
            total = sum(merge.from_json(raw).value("attempts") for raw in (
                txn.get_record("tasks", f"k{i}") for i in range(7)) if raw is not None)
            assert total == 100
        assert store.counters["reconnects"] >= 3
    finally:
        store.close()


def test_reads_reconnect_after_a_restart(own_pg_server: PgServer) -> None:
    """A read after the server restarted opens a fresh connection instead of failing."""
    url = own_pg_server.create_database(f"r_{uuid.uuid4().hex[:8]}")
    with PostgresStore(url) as store:
        store.transact(lambda t: t.allocate_seq("r1"))
        with store.read() as txn:
            assert txn.scope_seq("r1") == 1
        own_pg_server.restart()
        with store.read() as txn:
            assert txn.scope_seq("r1") == 1


def _advisory_waiters(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                           "AND NOT granted").fetchone()
    return int(row[0]) if row else 0


def test_schema_lock_waits_for_guarded_merges_and_they_see_its_generation(
        store: PostgresStore, url: str) -> None:
    """A publish (lock_schema) waits for a merge holding guard_schema; a merge whose
    guard comes after the publish committed reads the new generation."""
    other = PostgresStore(url)
    held, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def merge_like(txn: WriteTxn) -> None:
        seen.append(txn.guard_schema())
        held.set()
        assert release.wait(30)

    merging = threading.Thread(target=store.transact, args=(merge_like,), daemon=True)
    merging.start()
    assert held.wait(30)
    published: list[int] = []

    def publish_like(txn: WriteTxn) -> None:
        txn.lock_schema()
        published.append(txn.bump_registry())

    publishing = threading.Thread(target=other.transact, args=(publish_like,), daemon=True)
    publishing.start()
    try:
        wait_until(lambda: _advisory_waiters(url) == 1, timeout=20,
                   message="the publish did not queue behind the merge's schema lock")
        assert published == []
    finally:
        release.set()
    merging.join(30)
    publishing.join(30)
    assert published == [seen[0] + 1]
    assert store.transact(lambda t: t.guard_schema()) == published[0]
    other.close()


def test_schema_lock_after_a_scope_lock_is_refused(store: PostgresStore) -> None:
    def wrong(txn: WriteTxn) -> None:
        txn.lock_scopes(["r1"])
        txn.lock_schema()

    with pytest.raises(StoreError, match="lock_schema must come first"):
        store.transact(wrong)


def test_a_merge_queued_behind_a_publish_reads_the_generation_it_committed(
        store: PostgresStore, url: str) -> None:
    """guard_schema waits while a publish holds the schema lock, then reads the
    generation that publish committed (the read is a statement after the lock wait)."""
    other = PostgresStore(url)
    held, release = threading.Event(), threading.Event()

    def publish_like(txn: WriteTxn) -> int:
        txn.lock_schema()
        gen = txn.bump_registry()
        held.set()
        assert release.wait(30)
        return gen

    result: list[int] = []
    publishing = threading.Thread(target=lambda: result.append(other.transact(publish_like)),
                                  daemon=True)
    publishing.start()
    assert held.wait(30)
    seen: list[int] = []
    merging = threading.Thread(
        target=lambda: seen.append(store.transact(lambda t: t.guard_schema())), daemon=True)
    merging.start()
    try:
        wait_until(lambda: _advisory_waiters(url) == 1, timeout=20,
                   message="the merge did not queue behind the publish's schema lock")
        assert seen == []
    finally:
        release.set()
    publishing.join(30)
    merging.join(30)
    assert result and seen == result
    other.close()
