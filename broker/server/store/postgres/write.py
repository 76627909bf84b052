"""Write transactions of the PostgreSQL store (buffered, sent in one round trip)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

from broker.errors import StoreError
from broker.server.identity import NS_SEP, ns_device
from broker.server.store.base import (
    CommandRow,
    ConflictRow,
    DeadLetter,
    DeviceRow,
    LoginRemoval,
    Notice,
    OutcomeRow,
    SchemaVersionRow,
    ServerRow,
    Tomb,
)
from broker.server.store.postgres import letters
from broker.server.store.postgres.common import (
    _Blocked,
    _clean,
    _int_array,
    _Reorder,
    _text_array,
)
from broker.server.store.postgres.flush import BufferedWrites
from broker.server.store.postgres.read import (
    _MISSING,
    _NO_ROW,
    PgReadTxn,
    _outcome,
    _Row,
    _state_scope,
)
from broker.server.store.postgres.schema_lock import SchemaLocks

if TYPE_CHECKING:
    from broker.server.store.postgres.store import PostgresStore

# ---------------------------------------------------------------------------- writing


class PgWriteTxn(BufferedWrites, PgReadTxn, SchemaLocks):
    """WriteTxn over one READ COMMITTED transaction (see the module docstring)."""

    def __init__(self, store: PostgresStore, conn: psycopg.Connection[Any]) -> None:
        super().__init__(conn)
        self._store = store
        self._dead_letters = store.dead_letter_limits
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
        self._schema_lock = ""

    # --- scope locks

    def lock_scopes(self, scopes: Iterable[str]) -> None:
        """Lock the scopes' sequence rows until commit (see the module docstring)."""
        need = sorted(set(scopes).difference(self._locked))
        if not need:
            return
        self._hold_schema()
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
            # NOWAIT: another order is needed; a blocking wait: lock_timeout ran out.
            held = set(self._locked) | set(scopes)
            self._failed = _Reorder(held) if nowait else _Blocked(held)
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

    def prefetch(self, ns: str, numbers: Iterable[int],
                 keys: Iterable[tuple[str, str]]) -> None:
        """Read these outcomes and records in one round trip (kept for get_outcome and
        get_record; records only where this transaction holds their scope)."""
        if self._failed is not None:
            raise self._failed
        want_n = [n for n in numbers if (ns, n) not in self._out and (ns, n) not in self._out_db]
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
                        cur_n.execute("SELECT n, c, k, scope, q, code, reason, d FROM "
                                      "outcomes WHERE dev = %s AND n BETWEEN %s AND %s",
                                      (ns, low, high))
                    else:
                        cur_n.execute("SELECT o.n, o.c, o.k, o.scope, o.q, o.code, o.reason, "
                                      "o.d FROM unnest(%s::text::int8[]) AS u(n) JOIN "
                                      "outcomes AS o ON o.dev = %s AND o.n = u.n",
                                      (_int_array(want_n), ns))
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
            self._out_db[(ns, n)] = found_n.get(n)
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

    def get_outcome(self, ns: str, n: int) -> OutcomeRow | None:
        key = (ns, n)
        row = self._out.get(key)
        if row is not None:
            return row
        known = self._out_db.get(key, _MISSING)
        if known is not _MISSING:
            return known  # type: ignore[no-any-return]
        return super().get_outcome(ns, n)

    def put_outcome(self, ns: str, n: int, outcome: OutcomeRow) -> None:
        self._out[(ns, n)] = outcome

    def delete_outcomes(self, dev: str) -> int:
        # The legacy namespace (the id alone) and every incarnation's ("id/inc").
        self._sync()
        self._out_db = {key: row for key, row in self._out_db.items()
                        if ns_device(key[0]) != dev}
        return self._run("DELETE FROM outcomes WHERE dev = %s OR left(dev, %s) = %s",
                         (dev, len(dev) + len(NS_SEP), dev + NS_SEP)).rowcount

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

    def trim_conflicts(self, before_ms: int, keep_closed: int, limit: int = 10_000) -> int:
        return self._run(
            "DELETE FROM conflicts WHERE id IN (SELECT id FROM conflicts WHERE NOT open AND "
            "(GREATEST(created_ms, closed_ms) < %s OR id <= COALESCE((SELECT id FROM "
            "conflicts WHERE NOT open ORDER BY id DESC OFFSET %s LIMIT 1), 0)) "
            "ORDER BY id LIMIT %s)", (before_ms, keep_closed, limit)).rowcount

    # --- dead letters, commands, notices

    def add_dead_letter(self, letter: DeadLetter) -> int:
        return letters.add(self, self._dead_letters, letter)

    def trim_dead_letters(self, now_ms: int) -> int:
        return letters.trim(self, self._dead_letters, now_ms)

    def delete_dead_letter(self, lid: int) -> bool:
        return letters.delete(self, lid)

    def delete_dead_letters_of(self, dev: str) -> int:
        return letters.delete_of(self, dev)

    def put_command(self, row: CommandRow) -> None:
        self._run("INSERT INTO commands (dev, id, cmd, args, created_ms, done_ms) "
                  "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (dev, id) DO UPDATE SET "
                  "cmd = EXCLUDED.cmd, args = EXCLUDED.args, "
                  "created_ms = EXCLUDED.created_ms, done_ms = EXCLUDED.done_ms",
                  (row.device, row.id, row.cmd, Jsonb(row.args), row.created_ms,
                   row.done_ms))

    def delete_commands(self, dev: str) -> int:
        return self._run("DELETE FROM commands WHERE dev = %s", (dev,)).rowcount

    def put_login_removal(self, row: LoginRemoval) -> None:
        self._run("INSERT INTO login_removals (dev, id, queued_ms, failed_ms, error, hint) "
                  "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (dev) DO UPDATE SET "
                  "id = EXCLUDED.id, queued_ms = EXCLUDED.queued_ms, "
                  "failed_ms = EXCLUDED.failed_ms, error = EXCLUDED.error, hint = EXCLUDED.hint",
                  (row.device, row.id, row.queued_ms, row.failed_ms, _clean(row.error),
                   _clean(row.hint)))

    def delete_login_removal(self, dev: str) -> bool:
        return self._run("DELETE FROM login_removals WHERE dev = %s", (dev,)).rowcount > 0

    def put_server(self, row: ServerRow) -> None:
        self._run("INSERT INTO servers (id, grp, version, started_ms, seen_ms, stopped_ms, "
                  "broker_down_ms, proc, store_failing_ms, store_error) VALUES (%s, %s, %s, "
                  "%s, %s, %s, %s, %s, %s, %s) ON CONFLICT "
                  "(id) DO UPDATE SET grp = EXCLUDED.grp, version = EXCLUDED.version, "
                  "started_ms = EXCLUDED.started_ms, seen_ms = EXCLUDED.seen_ms, "
                  "stopped_ms = EXCLUDED.stopped_ms, broker_down_ms = EXCLUDED.broker_down_ms, "
                  "proc = EXCLUDED.proc, store_failing_ms = EXCLUDED.store_failing_ms, "
                  "store_error = EXCLUDED.store_error",
                  (row.id, _clean(row.group), _clean(row.version), row.started_ms,
                   row.seen_ms, row.stopped_ms, row.broker_down_ms, _clean(row.proc),
                   row.store_failing_ms, _clean(row.store_error)))

    def delete_server(self, server_id: str) -> bool:
        return self._run("DELETE FROM servers WHERE id = %s", (server_id,)).rowcount > 0

    def add_notice(self, notice: Notice) -> int:
        return int(self._one("INSERT INTO notices (scope, q, rec) VALUES (%s, %s, %s) "
                             "RETURNING id", (notice.scope, notice.q, Jsonb(notice.rec)))[0])

    def delete_notice(self, nid: int) -> None:
        self._run("DELETE FROM notices WHERE id = %s", (nid,))

    def put_schema_version(self, row: SchemaVersionRow) -> None:
        self._run("INSERT INTO schema_versions (version, published_ms, source, text, "
                  "rolled_back_ms) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (version) DO "
                  "UPDATE SET published_ms = EXCLUDED.published_ms, source = EXCLUDED.source, "
                  "text = EXCLUDED.text, rolled_back_ms = EXCLUDED.rolled_back_ms",
                  (row.version, row.published_ms, _clean(row.source), row.text,
                   row.rolled_back_ms))
