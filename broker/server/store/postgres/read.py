"""Read transactions of the PostgreSQL store."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg

from broker.server.store.base import (
    CommandRow,
    ConflictRow,
    DeadLetter,
    DeadLetterStats,
    DeviceRow,
    LoginRemoval,
    Notice,
    OutcomeRow,
    SchemaVersionRow,
    ServerRow,
    Tomb,
)
from broker.server.store.postgres import letters
from broker.server.store.postgres.common import PREFETCH_MAX

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

    def records_after(self, c: str | None, after: tuple[str, str] | None, limit: int
                      ) -> list[tuple[str, str, dict[str, Any]]]:
        if limit <= 0:
            return []
        self._sync()
        where = ["state IS NOT NULL"]
        params: list[Any] = []
        if c is not None:
            where.append("c = %s")
            params.append(c)
        if after is not None:
            where.append("(c, k) > (%s, %s)")
            params += [after[0], after[1]]
        params.append(limit)
        rows = self._all(f"SELECT c, k, state FROM records WHERE {' AND '.join(where)} "
                         "ORDER BY c, k LIMIT %s", params)
        return [(rc, rk, orjson.loads(state)) for rc, rk, state in rows]

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

    def get_outcome(self, ns: str, n: int) -> OutcomeRow | None:
        row = self._one("SELECT c, k, scope, q, code, reason, d FROM outcomes "
                        "WHERE dev = %s AND n = %s", (ns, n))
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

    def dead_letter_stats(self) -> DeadLetterStats:
        return letters.stats(self)

    def get_dead_letter(self, lid: int) -> DeadLetter | None:
        return letters.get(self, lid)

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

    def schema_versions(self) -> list[SchemaVersionRow]:
        self._sync()
        return [SchemaVersionRow(int(v), int(p), src, text, int(rb)) for v, p, src, text, rb
                in self._all("SELECT version, published_ms, source, text, rolled_back_ms "
                             "FROM schema_versions ORDER BY version")]

    _REMOVAL_COLS = "SELECT dev, id, queued_ms, failed_ms, error, hint FROM login_removals "

    def login_removals(self) -> list[LoginRemoval]:
        return [_removal(r) for r in self._all(self._REMOVAL_COLS + "ORDER BY queued_ms, dev")]

    def get_login_removal(self, dev: str) -> LoginRemoval | None:
        row = self._one(self._REMOVAL_COLS + "WHERE dev = %s", (dev,))
        return None if row is None else _removal(row)

    def servers(self) -> list[ServerRow]:
        rows = self._all("SELECT id, grp, version, started_ms, seen_ms, stopped_ms, "
                         "broker_down_ms, proc, store_failing_ms, store_error FROM servers "
                         "ORDER BY id")
        return [ServerRow(i, g, v, int(st), int(se), int(sp), int(bd), pr, int(sf), er)
                for i, g, v, st, se, sp, bd, pr, sf, er in rows]

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
    c, k, scope, q, code, reason, d = row
    if code:
        return OutcomeRow(c, k, code=code, reason=reason, d=d)
    return OutcomeRow(c, k, scope=scope, q=int(q), d=d)


def _removal(row: Any) -> LoginRemoval:
    dev, rid, queued, failed, error, hint = row
    return LoginRemoval(dev, rid, int(queued), int(failed), error, hint)


def _conflict(row: Any) -> ConflictRow:
    cid, created, c, k, s, fname, entry, is_open, closed, resolution = row
    return ConflictRow(int(cid), int(created), c, k, s, fname, entry, bool(is_open),
                       int(closed), resolution)


def _state_scope(raw: bytes) -> Any:
    state = orjson.loads(raw)
    return state.get("s") if isinstance(state, dict) else None
