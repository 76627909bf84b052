"""Sending a PostgreSQL write transaction's buffered writes (`PgWriteTxn._sync`): the
scope sequences, records, tombs, outcomes and device rows it wrote, as a few set
statements in one round trip (unnest for a few rows, binary COPY for many)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from broker.server.store.base import DeviceRow, OutcomeRow, Tomb
from broker.server.store.postgres.common import COPY_MIN, _clean, _int_array, _text_array
from broker.server.store.postgres.read import _NO_ROW, _Row

if TYPE_CHECKING:
    from broker.server.store.postgres.store import PostgresStore


class BufferedWrites:
    """Mixed into `PgWriteTxn` (which provides the attributes declared here)."""

    _store: PostgresStore
    _cur: psycopg.Cursor[Any]
    _failed: BaseException | None
    _locked: dict[str, list[int]]
    _seq_dirty: set[str]
    _rows_db: dict[tuple[str, str], _Row]
    _rows: dict[tuple[str, str], list[Any]]
    _tomb_put: dict[tuple[str, int], Tomb]
    _tomb_del: set[tuple[str, int]]
    _out: dict[tuple[str, int], OutcomeRow]
    _out_db: dict[tuple[str, int], OutcomeRow | None]
    _dev_base: dict[str, DeviceRow | None]
    _dev_new: dict[str, DeviceRow | None]
    _staging: bool

    if TYPE_CHECKING:  # provided by PgWriteTxn
        def _known(self, key: tuple[str, str], row: _Row) -> None: ...

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
            self._insert("outcomes",
                         ("dev", "n", "c", "k", "scope", "q", "code", "reason", "d"),
                         ("text", "int8", "text", "text", "text", "int8", "text", "text",
                          "text"),
                         [(d, n, r.c, r.k, r.scope, r.q, r.code, _clean(r.reason), r.d)
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


__all__ = ["BufferedWrites"]
