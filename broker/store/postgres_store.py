"""The PostgreSQL store: several merge consumers (`waystation server run` processes) over
one database.

Schema (``broker/store/migrations/*.sql``, everything in the schema ``waystation``)::

    registry_gen  one row: the registry generation
    devices       id -> data jsonb (DeviceRow.to_json())
    records       (c, k) -> state bytea (merge.to_json() as orjson bytes, never parsed
                  by the database), scope, q: the record's entry in the compacted change
                  log, indexed by (scope, q) (``records_log``): catch-up pages read it in
                  q order and get the states from the same rows
    scope_seq     scope -> q (last allocated), horizon (purge horizon); THE row lock
                  of the scope
    tombs         (scope, q) -> (c, k, t_ms)            oldest first per scope
    outcomes      (dev, n) -> (c, k, scope, q, code, reason); the primary key is what
                  makes a change apply once across consumers
    conflicts     id identity -> row; partial indexes on (c, k, field, id) and (id)
                  WHERE open
    dead_letters  id identity -> row (raw bytea); newest first by the primary key
    commands      (dev, id) -> row
    notices       id identity -> (scope, q, rec jsonb)

The log lives in the record rows because it holds exactly one entry per record, its
newest version: moving it is part of the record's own UPDATE instead of a delete and an
insert in another table. (A row can hold a bare log entry or a record without one, so
the primitives keep their meaning.)

Migrations are numbered ``NNNN_name.sql`` files applied on open, in one transaction
holding ``pg_advisory_xact_lock``, and recorded in ``schema_migrations``; a database
whose schema is newer than this code is refused (`StoreFormatError`).

Isolation (the obligations of `base.WriteTxn`). Write transactions run at READ
COMMITTED with explicit row locks:

* The scope lock. Every access of a write transaction to scope-keyed data (sequence,
  horizon, log, tombstones) first locks the scope's ``scope_seq`` row (``SELECT ...
  FOR UPDATE``) and keeps it until commit. So the transactions that write one scope
  commit one after another, each allocating q from the value its predecessor
  committed: sequences are gapless, and since a transaction releases its locks only
  after its commit is visible, no reader snapshot can contain q+1 without q (a
  checkpoint never skips a change committed later). A scope's row is created on first
  use by a separate autocommit statement, so that no transaction ever waits for another
  one's uncommitted insert of it.
* Records need no lock of their own. A record lives in exactly one scope (a change
  naming another scope is refused; `merge` never moves a record), and every writer of a
  record holds that scope's lock: `get_record` in a write transaction, on finding a
  record whose scope it does not hold yet, locks that scope and reads the record again.
  Reads after the lock are current (READ COMMITTED takes a new snapshot per
  statement), so read-modify-write of a record cannot lose an update. The one case a
  scope lock cannot cover - two transactions creating the same new (c, k) - ends in a
  unique violation on ``records``, which is retried (the retry sees the record).
* Outcomes: inserted with a plain INSERT; a concurrent consumer that applied the same
  change id first makes it fail with a unique violation, and the retry answers the
  change as a duplicate. Normally the scope lock already serialises the two (the
  applier locks a batch's scopes before it reads its outcomes), so the second finds
  the outcome on its first attempt.
* Deadlocks between scope locks are avoided rather than detected: a group locks the
  scopes of each batch in sorted order up front (`lock_scopes`, called by the applier);
  a lock on a scope that sorts *below* one already held is only tried (NOWAIT), and if
  it is taken the attempt is abandoned and rerun with every scope it needed locked
  first, in order. Hence every blocking wait is for a scope above all the waiter holds,
  and no cycle of waits on scope rows can form. The other waits come at commit time,
  in a fixed order of tables and keys (new records, outcomes, devices); trimming old
  dead letters skips rows another transaction holds. Anything left is caught by
  PostgreSQL's deadlock detector and retried.
* Devices: the engine reads a device row and writes it back modified. The write is a
  merge of only the fields this transaction changed (``data || diff``), so two
  consumers touching the same device (last seen, presence) never undo each other.

Writes to records (and their log entries), tombstones, outcomes, sequences and devices
are buffered in the transaction object (reads see them) and sent at commit, or before
a range read that could see them, as a few set statements (binary COPY for big sets):
a group of 2,000 changes costs a handful of round trips for its writes. Reads that the
applier is about to make are fetched per batch (`prefetch`).

`transact(fn)` retries fn from scratch on serialization failure, deadlock, lock
reordering or unique violation (bounded, with jittered backoff) and on a lost
connection (reconnecting, for up to `reconnect_s`). A commit whose outcome is unknown
(connection lost during COMMIT) is retried too: fn is idempotent at the level that
matters, because a change that did commit is found in ``outcomes`` and answered as a
duplicate. Any other database error becomes a `StoreError` naming the server without
the password.

`read()` gives a REPEATABLE READ, READ ONLY snapshot on a connection of its own (the
write connection stays free, so a transaction can run while a read is open).
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads

from broker.errors import StoreError, StoreFormatError
from broker.store.base import (
    MAX_DEAD_LETTER_RAW,
    CommandRow,
    ConflictRow,
    DeadLetter,
    DeviceRow,
    Notice,
    OutcomeRow,
    ReadTxn,
    StoreInfo,
    Tomb,
    WriteTxn,
)

T = TypeVar("T")

SCHEMA = "waystation"
"""The PostgreSQL schema (namespace) holding every table of the store."""

ADVISORY_LOCK = 0x5761797374617469
"""pg_advisory_xact_lock key serialising migrations ("Waystati")."""

DEFAULT_MAX_DEAD_LETTERS = 100_000
MAX_ATTEMPTS = 30
"""Attempts of one transaction that keeps meeting concurrency failures."""
PREFETCH_MAX = 16 * 1024
"""Catch-up reads prefetch record states up to this size with the index page."""
COPY_MIN = 64
"""Buffered writes of at least this many rows go by binary COPY, fewer by one INSERT."""
_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_RETRYABLE = ("40001", "40P01", "23505", "55P03")
_RECONNECT = ("57P01", "57P02", "57P03", "25006")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations this code knows, in version order (``migrations/NNNN_name.sql``)."""
    out = []
    for entry in resources.files("broker.store").joinpath("migrations").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    out.sort(key=lambda m: m.version)
    if [m.version for m in out] != list(range(1, len(out) + 1)):
        raise StoreError("the store's migrations are not numbered 1, 2, 3, ... "
                         "(broken installation)")
    return out


def describe_url(url: str) -> str:
    """`url` without its password: postgresql://user@host:port/dbname."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = str(params.get("user") or "")
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or "5432")
    db = str(params.get("dbname") or user or "")
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{db}"


class _Reorder(Exception):
    """A scope below one already held is locked by another transaction: rerun the
    transaction with all these scopes locked first, in order."""

    def __init__(self, scopes: set[str]) -> None:
        super().__init__("scope lock order")
        self.scopes = scopes


def _sqlstate(exc: BaseException) -> str:
    return getattr(exc, "sqlstate", None) or ""


def _text_array(values: Iterable[str]) -> str:
    """A text[] literal (quicker to build than psycopg's element-wise array dump)."""
    return "{" + ",".join(['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for v in values]) + "}"


def _int_array(values: Iterable[int]) -> str:
    """An int8[] literal."""
    return "{" + ",".join(map(str, values)) + "}"


def _clean(text: str) -> str:
    """PostgreSQL text cannot hold NUL."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text


# ---------------------------------------------------------------------------- reading

_MISSING: Any = object()
_Row = tuple[bytes | None, str | None, int | None]
"""A ``records`` row: (state, scope, q)."""
_NO_ROW: _Row = (None, None, None)


class PgReadTxn:
    """ReadTxn over one PostgreSQL transaction (also the base of the write transaction)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._cur = conn.cursor(binary=True)
        self._failed: BaseException | None = None
        self._pre: dict[tuple[str, str], bytes | None] = {}

    # --- plumbing

    def _run(self, sql: Any, params: Any = None) -> psycopg.Cursor[Any]:
        if self._failed is not None:
            raise self._failed
        try:
            return self._cur.execute(sql, params)
        except psycopg.Error as exc:
            self._failed = exc
            raise

    def _one(self, sql: Any, params: Any = None) -> Any:
        return self._run(sql, params).fetchone()

    def _all(self, sql: Any, params: Any = None) -> list[Any]:
        return self._run(sql, params).fetchall()

    def _sync(self) -> None:
        """Make buffered writes visible to the next query (write transactions)."""

    # --- registry

    def registry_generation(self) -> int:
        row = self._one("SELECT gen FROM registry_gen")
        return int(row[0]) if row else 0

    def get_device(self, dev: str) -> DeviceRow | None:
        row = self._one("SELECT data FROM devices WHERE id = %s", (dev,))
        return None if row is None else DeviceRow.from_json(row[0])

    def devices(self) -> list[DeviceRow]:
        self._sync()
        return [DeviceRow.from_json(r[0])
                for r in self._all("SELECT data FROM devices ORDER BY id")]

    # --- records and the log

    def get_record(self, c: str, k: str) -> dict[str, Any] | None:
        raw = self._pre.get((c, k), _MISSING)
        if raw is _MISSING:
            row = self._one("SELECT state FROM records WHERE c = %s AND k = %s", (c, k))
            raw = None if row is None else row[0]
        if raw is None:
            return None
        state: dict[str, Any] = orjson.loads(raw)
        return state

    def scope_seq(self, scope: str) -> int:
        row = self._one("SELECT q FROM scope_seq WHERE scope = %s", (scope,))
        return int(row[0]) if row else 0

    def scope_seqs(self) -> dict[str, int]:
        self._sync()
        return {s: int(q) for s, q in
                self._all("SELECT scope, q FROM scope_seq WHERE q > 0 ORDER BY scope")}

    def purge_horizon(self, scope: str) -> int:
        row = self._one("SELECT horizon FROM scope_seq WHERE scope = %s", (scope,))
        return int(row[0]) if row else 0

    def index_range(self, scope: str, after_q: int, limit: int) -> list[tuple[int, str, str]]:
        if limit <= 0:
            return []
        # A catch-up reads each record right after its log entry, which is in the same
        # row: keep the states (up to a size) for get_record.
        rows = self._all(
            "SELECT q, c, k, CASE WHEN octet_length(state) <= %s THEN state END, "
            "state IS NULL FROM records WHERE scope = %s AND q > %s ORDER BY q LIMIT %s",
            (PREFETCH_MAX, scope, after_q, limit))
        pre: dict[tuple[str, str], bytes | None] = {}
        for _q, c, k, state, missing in rows:
            if state is not None or missing:
                pre[(c, k)] = state
        self._pre = pre
        return [(int(q), c, k) for q, c, k, _, _ in rows]

    def tombs(self, scope: str, limit: int) -> list[Tomb]:
        if limit <= 0:
            return []
        self._sync()
        return [Tomb(scope, int(q), c, k, int(t)) for q, c, k, t in self._all(
            "SELECT q, c, k, t_ms FROM tombs WHERE scope = %s ORDER BY q LIMIT %s",
            (scope, limit))]

    # --- outcomes

    def get_outcome(self, dev: str, n: int) -> OutcomeRow | None:
        row = self._one("SELECT c, k, scope, q, code, reason FROM outcomes "
                        "WHERE dev = %s AND n = %s", (dev, n))
        return None if row is None else _outcome(row)

    # --- conflicts

    _CONFLICT_COLS = ("SELECT id, created_ms, c, k, s, field, entry, open, closed_ms, "
                      "resolution FROM conflicts ")

    def get_conflict(self, cid: int) -> ConflictRow | None:
        row = self._one(self._CONFLICT_COLS + "WHERE id = %s", (cid,))
        return None if row is None else _conflict(row)

    def conflicts(self, *, open_only: bool, limit: int) -> list[ConflictRow]:
        if limit <= 0:
            return []
        where = "WHERE open " if open_only else ""
        return [_conflict(r) for r in self._all(
            self._CONFLICT_COLS + where + "ORDER BY id DESC LIMIT %s", (limit,))]

    def open_conflicts_on(self, c: str, k: str, fname: str) -> list[int]:
        return [int(r[0]) for r in self._all(
            "SELECT id FROM conflicts WHERE open AND c = %s AND k = %s AND field = %s "
            "ORDER BY id", (c, k, fname))]

    # --- dead letters, commands, notices

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        if limit <= 0:
            return []
        return [DeadLetter(id=int(i), t_ms=int(t), device=d, topic=tp, code=code,
                           reason=reason, raw=bytes(raw), size=int(size))
                for i, t, d, tp, code, reason, raw, size in self._all(
                    "SELECT id, t_ms, device, topic, code, reason, raw, size "
                    "FROM dead_letters ORDER BY id DESC LIMIT %s", (limit,))]

    def commands(self, dev: str | None = None) -> list[CommandRow]:
        sql = "SELECT id, dev, cmd, args, created_ms, done_ms FROM commands "
        if dev is None:
            rows = self._all(sql + "ORDER BY created_ms, id")
        else:
            rows = self._all(sql + "WHERE dev = %s ORDER BY created_ms, id", (dev,))
        return [CommandRow(i, d, cmd, args, int(cr), int(dn)) for i, d, cmd, args, cr, dn
                in rows]

    def notices(self, limit: int) -> list[Notice]:
        if limit <= 0:
            return []
        return [Notice(int(i), s, int(q), rec) for i, s, q, rec in self._all(
            "SELECT id, scope, q, rec FROM notices ORDER BY id LIMIT %s", (limit,))]

    def counts(self) -> dict[str, int]:
        self._sync()
        names = ("records", "devices", "outcomes", "conflicts", "open_conflicts",
                 "dead_letters", "commands", "notices", "tombstones")
        row = self._one(
            "SELECT (SELECT count(*) FROM records WHERE state IS NOT NULL),"
            " (SELECT count(*) FROM devices), (SELECT count(*) FROM outcomes),"
            " (SELECT count(*) FROM conflicts), (SELECT count(*) FROM conflicts WHERE open),"
            " (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM commands),"
            " (SELECT count(*) FROM notices), (SELECT count(*) FROM tombs)")
        return {name: int(v) for name, v in zip(names, row, strict=True)}


def _outcome(row: Any) -> OutcomeRow:
    c, k, scope, q, code, reason = row
    if code:
        return OutcomeRow(c, k, code=code, reason=reason)
    return OutcomeRow(c, k, scope=scope, q=int(q))


def _conflict(row: Any) -> ConflictRow:
    cid, created, c, k, s, fname, entry, is_open, closed, resolution = row
    return ConflictRow(int(cid), int(created), c, k, s, fname, entry, bool(is_open),
                       int(closed), resolution)


def _state_scope(raw: bytes) -> Any:
    state = orjson.loads(raw)
    return state.get("s") if isinstance(state, dict) else None


# ---------------------------------------------------------------------------- writing


class PgWriteTxn(PgReadTxn):
    """WriteTxn over one READ COMMITTED transaction (see the module docstring)."""

    def __init__(self, store: PostgresStore, conn: psycopg.Connection[Any]) -> None:
        super().__init__(conn)
        self._store = store
        self._max_dead_letters = store.max_dead_letters
        # scope -> [q, horizon] for every scope whose row this transaction holds
        self._locked: dict[str, list[int]] = {}
        self._top = ""  # the highest scope locked
        self._seq_dirty: set[str] = set()
        # records rows: what the database holds (read under the scope lock, or written
        # by this transaction) and what this transaction will make of them
        self._rows_db: dict[tuple[str, str], _Row] = {}
        self._rows: dict[tuple[str, str], list[Any]] = {}
        self._by_q: dict[tuple[str, int], tuple[str, str]] = {}  # log entry -> key
        self._tomb_put: dict[tuple[str, int], Tomb] = {}
        self._tomb_del: set[tuple[str, int]] = set()
        self._out: dict[tuple[str, int], OutcomeRow] = {}  # written, not sent yet
        self._out_db: dict[tuple[str, int], OutcomeRow | None] = {}  # read (None: absent)
        self._dev_base: dict[str, DeviceRow | None] = {}
        self._dev_new: dict[str, DeviceRow | None] = {}
        self._staging = False  # created (or used) the staging table

    # --- scope locks

    def lock_scopes(self, scopes: Iterable[str]) -> None:
        """Lock the scopes' sequence rows until commit (see the module docstring)."""
        need = sorted(set(scopes).difference(self._locked))
        if not need:
            return
        below = [s for s in need if s < self._top]
        above = [s for s in need if s > self._top]
        if below:
            self._lock_rows(below, nowait=True)
        if above:
            self._lock_rows(above, nowait=False)

    def _lock_rows(self, scopes: list[str], *, nowait: bool) -> None:
        if self._failed is not None:
            raise self._failed
        sql = ("SELECT scope, q, horizon FROM scope_seq WHERE scope = ANY(%s) "
               "ORDER BY scope FOR UPDATE" + (" NOWAIT" if nowait else ""))
        try:
            rows = self._all(sql, (scopes,))
        except pg_errors.LockNotAvailable:
            self._failed = _Reorder(set(self._locked) | set(scopes))
            raise self._failed from None
        for scope, q, horizon in rows:
            self._locked[scope] = [int(q), int(horizon)]
        if rows:
            self._top = max(self._top, rows[-1][0])
        missing = [s for s in scopes if s not in self._locked]
        if missing:  # first use of these scopes: create their rows (committed), lock them
            try:
                self._store._create_scopes(missing)
            except psycopg.Error as exc:
                self._failed = exc
                raise
            self.lock_scopes(missing)

    def _scope(self, scope: str) -> list[int]:
        entry = self._locked.get(scope)
        if entry is None:
            self.lock_scopes((scope,))
            entry = self._locked[scope]
        return entry

    # --- registry

    def get_device(self, dev: str) -> DeviceRow | None:
        if dev in self._dev_new:
            return self._dev_new[dev]
        row = super().get_device(dev)
        self._dev_base[dev] = row
        return row

    def put_device(self, row: DeviceRow) -> None:
        if row.id not in self._dev_base and row.id not in self._dev_new:
            self._dev_base[row.id] = super().get_device(row.id)
        self._dev_new[row.id] = row

    def delete_device(self, dev: str) -> bool:
        existed = self.get_device(dev) is not None
        self._dev_new[dev] = None
        return existed

    def bump_registry(self) -> int:
        return int(self._one("UPDATE registry_gen SET gen = gen + 1 RETURNING gen")[0])

    # --- records and the log

    def _known(self, key: tuple[str, str], row: _Row) -> None:
        self._rows_db[key] = row
        if row[2] is not None:
            assert row[1] is not None
            self._by_q[(row[1], row[2])] = key

    def _current(self, key: tuple[str, str]) -> _Row | None:
        """The row as this transaction sees it (None: not read yet)."""
        target = self._rows.get(key)
        if target is not None:
            return (target[0], target[1], target[2])
        return self._rows_db.get(key)

    def get_record(self, c: str, k: str) -> dict[str, Any] | None:
        key = (c, k)
        row = self._current(key)
        if row is not None:
            return None if row[0] is None else orjson.loads(row[0])
        for _ in range(8):
            found = self._one("SELECT state, scope, q FROM records WHERE c = %s AND k = %s",
                              key)
            row = _NO_ROW if found is None else (found[0], found[1], found[2])
            if row[0] is None:
                self._known(key, row)
                return None
            state: dict[str, Any] = orjson.loads(row[0])
            scope = state.get("s") if isinstance(state, dict) else None
            if not isinstance(scope, str) or scope in self._locked:
                self._known(key, row)
                return state
            self.lock_scopes((scope,))  # then read it again, now that nobody can change it
        raise StoreError(f"record {c}/{k} keeps changing scope")  # pragma: no cover

    def prefetch(self, dev: str, ns: Iterable[int], keys: Iterable[tuple[str, str]]) -> None:
        """Read these outcomes and records in one round trip (kept for get_outcome and
        get_record; records only where this transaction holds their scope)."""
        if self._failed is not None:
            raise self._failed
        want_n = [n for n in ns if (dev, n) not in self._out and (dev, n) not in self._out_db]
        want_k = sorted({key for key in keys if key not in self._rows
                         and key not in self._rows_db})
        if not want_n and not want_k:
            return
        try:
            with self._conn.pipeline():
                cur_n = cur_k = None
                if want_n:
                    cur_n = self._conn.cursor(binary=True)
                    low, high = min(want_n), max(want_n)
                    if high - low < 4 * len(want_n):  # a batch's numbers are mostly a run
                        cur_n.execute("SELECT n, c, k, scope, q, code, reason FROM outcomes "
                                      "WHERE dev = %s AND n BETWEEN %s AND %s",
                                      (dev, low, high))
                    else:
                        cur_n.execute("SELECT o.n, o.c, o.k, o.scope, o.q, o.code, o.reason "
                                      "FROM unnest(%s::text::int8[]) AS u(n) JOIN outcomes "
                                      "AS o ON o.dev = %s AND o.n = u.n",
                                      (_int_array(want_n), dev))
                if want_k:
                    cur_k = self._conn.cursor(binary=True)
                    cur_k.execute("SELECT r.c, r.k, r.state, r.scope, r.q FROM unnest("
                                  "%s::text::text[], %s::text::text[]) AS u(c, k) "
                                  "JOIN records AS r ON r.c = u.c AND r.k = u.k",
                                  (_text_array([c for c, _ in want_k]),
                                   _text_array([k for _, k in want_k])))
            found_n = {} if cur_n is None else {int(r[0]): _outcome(r[1:])
                                                for r in cur_n.fetchall()}
            found_k = {} if cur_k is None else {(r[0], r[1]): (r[2], r[3], r[4])
                                                for r in cur_k.fetchall()}
        except psycopg.Error as exc:
            self._failed = exc
            raise
        for n in want_n:
            self._out_db[(dev, n)] = found_n.get(n)
        locked = self._locked
        for key in want_k:
            row = found_k.get(key, _NO_ROW)
            if row[0] is None:
                self._known(key, row)
                continue
            # A record's log entry is in its own scope: no need to parse the state.
            scope = row[1] if row[1] is not None else _state_scope(row[0])
            if scope in locked:
                self._known(key, row)

    def scope_seq(self, scope: str) -> int:
        return self._scope(scope)[0]

    def allocate_seq(self, scope: str) -> int:
        entry = self._scope(scope)
        entry[0] += 1
        self._seq_dirty.add(scope)
        return entry[0]

    def purge_horizon(self, scope: str) -> int:
        return self._scope(scope)[1]

    def set_purge_horizon(self, scope: str, q: int) -> None:
        self._scope(scope)[1] = q
        self._seq_dirty.add(scope)

    def jump_scope_seq(self, scope: str, q: int) -> None:
        entry = self._scope(scope)
        if q < entry[0]:
            raise ValueError(f"scope {scope!r}: a sequence only moves forward")
        entry[0] = q
        self._seq_dirty.add(scope)

    def _target(self, key: tuple[str, str]) -> list[Any]:
        """The row this transaction will write for `key` (read first if unknown)."""
        target = self._rows.get(key)
        if target is None:
            base = self._rows_db.get(key)
            if base is None:  # written without being read (not the applier's way)
                found = self._one("SELECT state, scope, q FROM records "
                                  "WHERE c = %s AND k = %s", key)
                base = _NO_ROW if found is None else (found[0], found[1], found[2])
                self._known(key, base)
            target = self._rows[key] = list(base)
        return target

    def put_record(self, c: str, k: str, state: dict[str, Any] | bytes) -> None:
        self._target((c, k))[0] = state if isinstance(state, bytes) else orjson.dumps(state)

    def delete_record(self, c: str, k: str) -> None:
        self._target((c, k))[0] = None

    def index_range(self, scope: str, after_q: int, limit: int) -> list[tuple[int, str, str]]:
        self._scope(scope)
        self._sync()
        if limit <= 0:
            return []
        return [(int(q), c, k) for q, c, k in self._all(
            "SELECT q, c, k FROM records WHERE scope = %s AND q > %s ORDER BY q LIMIT %s",
            (scope, after_q, limit))]

    def index_move(self, scope: str, old_q: int, new_q: int, c: str, k: str) -> None:
        self._scope(scope)
        key = (c, k)
        target = self._target(key)
        if old_q and (target[1], target[2]) != (scope, old_q):
            self.index_delete(scope, old_q)  # an entry of another row (not the usual case)
            target = self._target(key)
        target[1], target[2] = scope, new_q
        self._by_q[(scope, new_q)] = key

    def index_delete(self, scope: str, q: int) -> None:
        self._scope(scope)
        key = self._by_q.get((scope, q))
        if key is None:  # not a row this transaction knows: find it
            self._sync()
            found = self._one("SELECT c, k, state FROM records WHERE scope = %s AND q = %s",
                              (scope, q))
            if found is None:
                return
            key = (found[0], found[1])
            self._known(key, (found[2], scope, q))
        target = self._target(key)
        if (target[1], target[2]) == (scope, q):
            target[1] = target[2] = None

    def tombs(self, scope: str, limit: int) -> list[Tomb]:
        self._scope(scope)
        return super().tombs(scope, limit)

    def put_tomb(self, tomb: Tomb) -> None:
        self._scope(tomb.scope)
        self._tomb_put[(tomb.scope, tomb.q)] = tomb

    def delete_tomb(self, scope: str, q: int) -> None:
        self._scope(scope)
        if self._tomb_put.pop((scope, q), None) is None:
            self._tomb_del.add((scope, q))

    # --- outcomes

    def get_outcome(self, dev: str, n: int) -> OutcomeRow | None:
        key = (dev, n)
        row = self._out.get(key)
        if row is not None:
            return row
        known = self._out_db.get(key, _MISSING)
        if known is not _MISSING:
            return known  # type: ignore[no-any-return]
        return super().get_outcome(dev, n)

    def put_outcome(self, dev: str, n: int, outcome: OutcomeRow) -> None:
        self._out[(dev, n)] = outcome

    def delete_outcomes(self, dev: str) -> int:
        self._sync()
        self._out_db = {key: row for key, row in self._out_db.items() if key[0] != dev}
        return self._run("DELETE FROM outcomes WHERE dev = %s", (dev,)).rowcount

    # --- conflicts

    def add_conflict(self, row: ConflictRow) -> int:
        return int(self._one(
            "INSERT INTO conflicts (created_ms, c, k, s, field, entry, open, closed_ms, "
            "resolution) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (row.created_ms, row.c, row.k, row.s, row.field, Jsonb(row.entry), row.open,
             row.closed_ms, _clean(row.resolution)))[0])

    def close_conflict(self, cid: int, closed_ms: int, resolution: str) -> bool:
        return self._one("UPDATE conflicts SET open = false, closed_ms = %s, resolution = %s "
                         "WHERE id = %s AND open RETURNING id",
                         (closed_ms, _clean(resolution), cid)) is not None

    # --- dead letters, commands, notices

    def add_dead_letter(self, letter: DeadLetter) -> int:
        raw = bytes(letter.raw[:MAX_DEAD_LETTER_RAW])
        lid = int(self._one(
            "INSERT INTO dead_letters (t_ms, device, topic, code, reason, raw, size) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (letter.t_ms, _clean(letter.device), _clean(letter.topic), _clean(letter.code),
             _clean(letter.reason), raw, letter.size or len(letter.raw)))[0])
        # Ids come from one sequence: those more than the limit below this one are older
        # than the newest `limit` letters (ids burnt by rolled-back transactions only
        # make the store keep a few less).
        if lid > self._max_dead_letters:  # (never waiting for another transaction)
            self._run("DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters "
                      "WHERE id <= %s FOR UPDATE SKIP LOCKED)",
                      (lid - self._max_dead_letters,))
        return lid

    def put_command(self, row: CommandRow) -> None:
        self._run("INSERT INTO commands (dev, id, cmd, args, created_ms, done_ms) "
                  "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (dev, id) DO UPDATE SET "
                  "cmd = EXCLUDED.cmd, args = EXCLUDED.args, "
                  "created_ms = EXCLUDED.created_ms, done_ms = EXCLUDED.done_ms",
                  (row.device, row.id, row.cmd, Jsonb(row.args), row.created_ms,
                   row.done_ms))

    def delete_commands(self, dev: str) -> int:
        return self._run("DELETE FROM commands WHERE dev = %s", (dev,)).rowcount

    def add_notice(self, notice: Notice) -> int:
        return int(self._one("INSERT INTO notices (scope, q, rec) VALUES (%s, %s, %s) "
                             "RETURNING id", (notice.scope, notice.q, Jsonb(notice.rec)))[0])

    def delete_notice(self, nid: int) -> None:
        self._run("DELETE FROM notices WHERE id = %s", (nid,))

    # --- sending the buffered writes

    def _sync(self) -> None:
        if self._failed is not None:
            raise self._failed
        if not (self._seq_dirty or self._rows or self._tomb_put or self._tomb_del
                or self._out or self._dev_new):
            return
        try:
            self._send()
        except psycopg.Error as exc:
            self._failed = exc
            raise

    def _send(self) -> None:
        """Send the buffered writes: a few set statements (COPY for big sets)."""
        if self._seq_dirty:
            scopes = sorted(self._seq_dirty)
            self._cur.execute(
                "UPDATE scope_seq AS s SET q = u.q, horizon = u.h FROM unnest("
                "%s::text[], %s::int8[], %s::int8[]) AS u(scope, q, h) "
                "WHERE s.scope = u.scope",
                (scopes, [self._locked[s][0] for s in scopes],
                 [self._locked[s][1] for s in scopes]))
            self._seq_dirty = set()
        if self._rows:
            self._send_records()
        if self._tomb_del:
            per_scope: dict[str, list[int]] = {}
            for scope, q in self._tomb_del:
                per_scope.setdefault(scope, []).append(q)
            for scope in sorted(per_scope):
                self._cur.execute("DELETE FROM tombs WHERE scope = %s "
                                  "AND q = ANY(%s::text::int8[])",
                                  (scope, _int_array(sorted(per_scope[scope]))))
            self._tomb_del = set()
        if self._tomb_put:
            self._insert("tombs", ("scope", "q", "c", "k", "t_ms"),
                         ("text", "int8", "text", "text", "int8"),
                         [(t.scope, t.q, t.c, t.k, t.t_ms)
                          for _, t in sorted(self._tomb_put.items())])
            self._tomb_put = {}
        if self._out:
            out = self._out
            self._insert("outcomes", ("dev", "n", "c", "k", "scope", "q", "code", "reason"),
                         ("text", "int8", "text", "text", "text", "int8", "text", "text"),
                         [(d, n, r.c, r.k, r.scope, r.q, r.code, _clean(r.reason))
                          for (d, n), r in sorted(out.items())])
            self._out_db.update(out)
            self._out = {}
        for dev in sorted(self._dev_new):
            self._send_device(dev, self._dev_new[dev])
        self._dev_new = {}

    def _send_records(self) -> None:
        gone: list[tuple[str, str]] = []
        new: list[tuple[str, str, bytes | None, str | None, int | None]] = []
        changed: list[tuple[str, str, bytes | None, str | None, int | None]] = []
        for key, target in sorted(self._rows.items()):
            row: _Row = (target[0], target[1], target[2])
            base = self._rows_db[key]
            if row == base:
                continue
            if row == _NO_ROW:
                gone.append(key)
            elif base == _NO_ROW:
                new.append((*key, *row))
            else:
                changed.append((*key, *row))
            self._known(key, row)
        self._rows = {}
        run = self._cur.execute
        if gone:
            run("DELETE FROM records AS r USING unnest(%s::text::text[], %s::text::text[]) "
                "AS u(c, k) WHERE r.c = u.c AND r.k = u.k",
                (_text_array([c for c, _ in gone]), _text_array([k for _, k in gone])))
        cols = ("c", "k", "state", "scope", "q")
        types = ("text", "text", "bytea", "text", "int8")
        if new:  # a plain insert: a concurrent creator of the same key makes it fail
            self._insert("records", cols, types, new)
        if not changed:
            return
        # rows read under their scope's lock: they are there, as read
        sets = "state = u.state, scope = u.scope, q = u.q"
        if len(changed) < COPY_MIN:
            run(f"UPDATE records AS r SET {sets} FROM unnest(%s::text[], %s::text[], "
                "%s::bytea[], %s::text[], %s::int8[]) AS u(c, k, state, scope, q) "
                "WHERE r.c = u.c AND r.k = u.k", tuple(map(list, zip(*changed, strict=True))))
            return
        if self._staging:  # used before in this transaction
            run("DELETE FROM pg_temp.ws_stage")
        elif not self._store._staged:  # (emptied at every commit)
            run("CREATE TEMP TABLE IF NOT EXISTS ws_stage (c text, k text, state bytea, "
                "scope text, q bigint) ON COMMIT DELETE ROWS")
        self._staging = True
        self._copy("pg_temp.ws_stage", cols, types, changed)
        run(f"UPDATE records AS r SET {sets} FROM pg_temp.ws_stage AS u "
            "WHERE r.c = u.c AND r.k = u.k")

    def _insert(self, table: str, cols: tuple[str, ...], types: tuple[str, ...],
                rows: list[tuple[Any, ...]]) -> None:
        """Plain INSERT of `rows` (unnest for a few, binary COPY for many)."""
        if len(rows) >= COPY_MIN:
            self._copy(table, cols, types, rows)
            return
        arrays = ", ".join(f"%s::{t}[]" for t in types)
        self._cur.execute(f"INSERT INTO {table} ({', '.join(cols)}) "
                          f"SELECT * FROM unnest({arrays})",
                          tuple(map(list, zip(*rows, strict=True))))

    def _copy(self, table: str, cols: tuple[str, ...], types: tuple[str, ...],
              rows: list[tuple[Any, ...]]) -> None:
        with self._cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN "
                            "(FORMAT BINARY)") as copy:
            copy.set_types(list(types))
            for row in rows:
                copy.write_row(row)

    def _send_device(self, dev: str, new: DeviceRow | None) -> None:
        run = self._cur.execute
        base = self._dev_base.get(dev)
        if new is None:
            run("DELETE FROM devices WHERE id = %s", (dev,))
            self._dev_base[dev] = None
            return
        data = new.to_json()
        if base is None:  # it did not exist: a concurrent creator makes this fail
            run("INSERT INTO devices (id, data) VALUES (%s, %s)", (dev, Jsonb(data)))
        else:  # only what this transaction changed, over whatever is there now
            old = base.to_json()
            diff = {name: value for name, value in data.items() if old.get(name) != value}
            if diff:
                run("UPDATE devices SET data = data || %s WHERE id = %s", (Jsonb(diff), dev))
        self._dev_base[dev] = new


# ---------------------------------------------------------------------------- the store


class PostgresStore:
    """The store in one PostgreSQL database (see module docstring)."""

    kind = "postgres"

    def __init__(self, url: str, *, max_dead_letters: int = DEFAULT_MAX_DEAD_LETTERS,
                 reconnect_s: float = 30.0, connect_timeout_s: int = 10) -> None:
        self.url = url
        self.location = describe_url(url)
        self.max_dead_letters = max_dead_letters
        self.reconnect_s = reconnect_s
        self._connect_timeout = connect_timeout_s
        self._conninfo = self._make_conninfo(url)
        self._conn: psycopg.Connection[Any] | None = None
        self._readers: list[psycopg.Connection[Any]] = []
        self._aux: psycopg.Connection[Any] | None = None  # autocommit, for new scopes
        self._staged = False  # the write connection has its staging table
        self.counters: dict[str, int] = {"retries": 0, "reconnects": 0, "reorders": 0}
        self._closed = False
        conn = self._connect(write=True)
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # --- connections

    def _make_conninfo(self, url: str) -> str:
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"store.url is not a valid PostgreSQL URL: {exc}") from None
        options = str(params.get("options") or "") + (
            f" -c search_path={SCHEMA} -c idle_in_transaction_session_timeout=60000"
            " -c plan_cache_mode=force_custom_plan")
        return make_conninfo(url, options=options.strip(),
                             application_name=params.get("application_name") or "waystation",
                             keepalives=1, keepalives_idle=10, keepalives_interval=5,
                             keepalives_count=3)

    def _connect(self, *, write: bool) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=False,
                                   connect_timeout=self._connect_timeout)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot connect to the PostgreSQL store at {self.location}: "
                f"{str(exc).strip()} (check store.url, that the server runs and accepts "
                "connections from this host, and the user's password)") from exc
        set_json_loads(orjson.loads, conn)
        set_json_dumps(orjson.dumps, conn)
        if write:  # whatever the server's default: the locking above assumes it
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        else:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
        return conn

    def _write_conn(self, deadline: float) -> psycopg.Connection[Any]:
        """The write connection, (re)connecting until `deadline` if it is gone."""
        if self._closed:
            raise StoreError(f"the PostgreSQL store at {self.location} is closed")
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                return conn
            try:
                conn.rollback()
                return conn
            except psycopg.Error:
                pass  # gone: reconnect below
        if conn is not None:
            conn.close()
            self._conn = None
        delay = 0.05
        while True:
            try:
                self._conn = self._connect(write=True)
                self._staged = False
                self.counters["reconnects"] += 1
                return self._conn
            except StoreError:
                if time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 1.0)

    def _create_scopes(self, scopes: list[str]) -> None:
        """Create the sequence rows of new scopes in a transaction of their own.

        Inserting them inside the caller's transaction would make other transactions
        wait for it on a row it has not locked in scope order (a deadlock risk). A row
        whose transaction later rolls back stays at q = 0, which means "never used".
        """
        conn = self._aux
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._aux = psycopg.connect(self._conninfo, autocommit=True,
                                               connect_timeout=self._connect_timeout)
        conn.execute("INSERT INTO scope_seq (scope) SELECT unnest(%s::text[]) "
                     "ON CONFLICT DO NOTHING", (sorted(scopes),))

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        known = migrations()
        latest = known[-1].version
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
                # DDL only when needed: a database set up by its owner can then be used
                # by a role that may not create anything
                cur.execute("SELECT to_regnamespace(%s), to_regclass(%s)",
                            (SCHEMA, f"{SCHEMA}.schema_migrations"))
                has_schema, has_table = cur.fetchone() or (None, None)
                if has_schema is None:
                    cur.execute(f"CREATE SCHEMA {SCHEMA}")
                if has_table is None:
                    cur.execute("CREATE TABLE schema_migrations ("
                                "version integer PRIMARY KEY, name text NOT NULL, "
                                "applied_at timestamptz NOT NULL DEFAULT now())")
                cur.execute("SELECT version FROM schema_migrations")
                applied = {int(r[0]) for r in cur.fetchall()}
                newest = max(applied, default=0)
                if newest > latest:
                    raise StoreFormatError(
                        f"the PostgreSQL store at {self.location} has schema version "
                        f"{newest}, newer than this version of Waystation knows ({latest}): "
                        "upgrade Waystation on this host, or point store.url at another "
                        "database")
                for m in known:
                    if m.version not in applied:
                        cur.execute(m.sql.encode())
                        cur.execute("INSERT INTO schema_migrations (version, name) "
                                    "VALUES (%s, %s)", (m.version, m.name))
            conn.commit()
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            raise StoreError(f"cannot prepare the PostgreSQL store at {self.location}: "
                             f"{str(exc).strip()} (the user needs the right to create a "
                             f"schema and tables in this database)") from exc
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            raise

    def schema_version(self) -> int:
        """The newest migration applied to the database."""
        with self.read() as txn:
            assert isinstance(txn, PgReadTxn)
            row = txn._one("SELECT max(version) FROM schema_migrations")
            return int(row[0] or 0)

    # --- transactions

    @contextmanager
    def read(self) -> Iterator[ReadTxn]:
        conn = self._reader()
        txn = PgReadTxn(conn)
        try:
            try:
                txn._one("SELECT 1")  # takes the snapshot now
            except psycopg.OperationalError:
                if not (conn.broken or conn.closed):
                    raise
                conn.close()  # the server went away since: one fresh try
                conn = self._connect(write=False)
                txn = PgReadTxn(conn)
                txn._one("SELECT 1")
            yield txn
        except psycopg.Error as exc:
            raise StoreError(f"reading the PostgreSQL store at {self.location} failed: "
                             f"{str(exc).strip()}") from exc
        finally:
            self._release(conn)

    def _reader(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StoreError(f"the PostgreSQL store at {self.location} is closed")
        while self._readers:
            conn = self._readers.pop()
            if not conn.closed and not conn.broken:
                return conn
            conn.close()
        return self._connect(write=False)

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            conn.close()
            return
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()
            return
        if len(self._readers) < 2 and not self._closed:
            self._readers.append(conn)
        else:
            conn.close()

    def transact(self, fn: Callable[[WriteTxn], T]) -> T:
        deadline = time.monotonic() + self.reconnect_s
        prelock: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            conn = self._write_conn(deadline)
            txn = PgWriteTxn(self, conn)
            try:
                if prelock:
                    txn.lock_scopes(prelock)
                result = fn(txn)
                if txn._failed is not None:  # fn swallowed a failure of ours
                    raise txn._failed
                txn._send()
                conn.commit()
                self._staged = self._staged or txn._staging
                return result
            except BaseException as raised:
                self._abort(conn)
                if not isinstance(raised, Exception):  # KeyboardInterrupt, SystemExit
                    raise
                exc = txn._failed or raised  # ours, even if fn turned it into another
                if isinstance(exc, _Reorder):
                    self.counters["reorders"] += 1
                    prelock |= exc.scopes
                    if attempt < MAX_ATTEMPTS:
                        continue
                    raise StoreError(f"the PostgreSQL store at {self.location}: a "
                                     f"transaction failed {attempt} times on lock "
                                     "order; retry later") from None
                if not isinstance(exc, psycopg.Error):
                    raise
                prelock |= set(txn._locked)
                state = _sqlstate(exc)
                if state in _RETRYABLE and attempt < MAX_ATTEMPTS:
                    self.counters["retries"] += 1
                    time.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** min(attempt, 10))))
                    continue
                if self._lost(conn, exc):
                    conn.close()
                    if time.monotonic() < deadline:
                        continue  # _write_conn reconnects (or gives up at the deadline)
                raise StoreError(self._message(exc, attempt)) from exc

    def _lost(self, conn: psycopg.Connection[Any], exc: psycopg.Error) -> bool:
        state = _sqlstate(exc)
        return (conn.closed or conn.broken or state.startswith("08") or state in _RECONNECT
                or (isinstance(exc, psycopg.OperationalError) and not state))

    def _message(self, exc: psycopg.Error, attempts: int) -> str:
        state = _sqlstate(exc)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if state in _RETRYABLE:
            return (f"the PostgreSQL store at {self.location}: a transaction failed "
                    f"{attempts} times on concurrent updates ({state}: {text}); retry later")
        if self._conn is None or self._conn.closed or self._conn.broken:
            return (f"lost the PostgreSQL store at {self.location} and could not reconnect "
                    f"within {self.reconnect_s:g} s: {text} (check that the server runs)")
        return f"the PostgreSQL store at {self.location} failed ({state or 'error'}): {text}"

    def _abort(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()

    # --- information

    def info(self) -> StoreInfo:
        with self.read() as txn:
            counts = txn.counts()
            assert isinstance(txn, PgReadTxn)
            row = txn._one("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) "
                           "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE n.nspname = %s AND c.relkind = 'r'", (SCHEMA,))
        return StoreInfo(kind=self.kind, location=self.location, size_bytes=int(row[0]),
                         capacity_bytes=0, counts=counts)

    def close(self) -> None:
        self._closed = True
        conns = [*self._readers, *(c for c in (self._conn, self._aux) if c is not None)]
        self._readers, self._conn, self._aux = [], None, None
        for conn in conns:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DEFAULT_MAX_DEAD_LETTERS", "SCHEMA", "Migration", "PgReadTxn", "PgWriteTxn",
           "PostgresStore", "describe_url", "migrations"]
