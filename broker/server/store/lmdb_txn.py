"""The LMDB transactions of the server store, and the table layout in one place.

Key layout (integers are 8-byte big-endian so keys sort numerically; NUL separates
strings, which never contain it: ids, collection names and keys exclude control
characters):

    meta          b"format" -> b"2" (`base.STORE_FORMAT`); b"registry" -> gen;
                  b"next:<table>" -> next id
    devices       dev -> JSON DeviceRow
    records       c NUL k -> JSON RecordState
    seqs          scope -> q
    horizons      scope -> q
    index         scope NUL q -> c NUL k
    tombs         scope NUL q -> JSON [c, k, t_ms]
    outcomes      ns NUL n -> JSON [c, k, scope, q, d] | [c, k, code, reason, d]
                  (ns: device id [+ "/" incarnation]; d, the digest, absent in rows
                  written before digests)
    conflicts     id -> JSON ConflictRow
    conflicts_open  c NUL k NUL field NUL id -> b""
    deadletters   id -> u32 header length, JSON header, raw payload (and totals in meta:
                  see `broker.server.store.lmdb_letters`)
    commands      dev NUL id -> JSON CommandRow
    login_removals  dev -> JSON LoginRemoval (`broker.server.store.lmdb_removals`)
    servers       server id -> JSON ServerRow (`broker.server.store.lmdb_servers`)
    notices       id -> JSON [scope, q, rec]
    schemas       version -> JSON SchemaVersionRow
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lmdb
import orjson

from broker.server.identity import NS_SEP
from broker.server.store import lmdb_conflicts, lmdb_letters, lmdb_removals, lmdb_servers
from broker.server.store.base import (
    CommandRow,
    ConflictRow,
    DeadLetter,
    DeadLetterLimits,
    DeadLetterStats,
    DeviceRow,
    LoginRemoval,
    Notice,
    OutcomeRow,
    SchemaVersionRow,
    ServerRow,
    Tomb,
)
from broker.server.store.lmdb_bytes import SEP as _SEP
from broker.server.store.lmdb_bytes import U64 as _U64
from broker.server.store.lmdb_bytes import from_u64 as _from_u64
from broker.server.store.lmdb_bytes import text as _s
from broker.server.store.lmdb_bytes import u64 as _u64

DBS = ("meta", "devices", "records", "seqs", "horizons", "index", "tombs", "outcomes",
       "conflicts", "conflicts_open", "deadletters", "commands", "notices", "schemas",
       "login_removals", "servers")
DEFAULT_MAX_DEAD_LETTERS = DeadLetterLimits().max_count


class LmdbReadTxn:
    """ReadTxn over one LMDB transaction (also the base of the write transaction)."""

    __slots__ = ("_db", "_txn")

    def __init__(self, txn: lmdb.Transaction[bytes], dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._db = dbs

    # --- registry

    def registry_generation(self) -> int:
        raw = self._txn.get(b"registry", db=self._db["meta"])
        return 0 if raw is None else _from_u64(raw)

    def get_device(self, dev: str) -> DeviceRow | None:
        raw = self._txn.get(_s(dev), db=self._db["devices"])
        return None if raw is None else DeviceRow.from_json(orjson.loads(raw))

    def devices(self) -> list[DeviceRow]:
        with self._txn.cursor(db=self._db["devices"]) as cur:
            return [DeviceRow.from_json(orjson.loads(v)) for _, v in cur]

    # --- records and the log

    def get_record(self, c: str, k: str) -> dict[str, Any] | None:
        raw = self._txn.get(f"{c}\0{k}".encode(), db=self._db["records"])
        if raw is None:
            return None
        state: dict[str, Any] = orjson.loads(raw)
        return state

    def records_after(self, c: str | None, after: tuple[str, str] | None, limit: int
                      ) -> list[tuple[str, str, dict[str, Any]]]:
        out: list[tuple[str, str, dict[str, Any]]] = []
        if limit <= 0:
            return out
        prefix = b"" if c is None else _s(c) + _SEP
        start = prefix if after is None else _s(after[0]) + _SEP + _s(after[1])
        with self._txn.cursor(db=self._db["records"]) as cur:
            if not cur.set_range(max(start, prefix)):
                return out
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                if after is not None and key == start:
                    continue
                rc, _, rk = key.partition(_SEP)
                out.append((rc.decode(), rk.decode(), orjson.loads(value)))
                if len(out) >= limit:
                    break
        return out

    def scope_seq(self, scope: str) -> int:
        raw = self._txn.get(_s(scope), db=self._db["seqs"])
        return 0 if raw is None else _from_u64(raw)

    def scope_seqs(self) -> dict[str, int]:
        with self._txn.cursor(db=self._db["seqs"]) as cur:
            return {k.decode(): _from_u64(v) for k, v in cur}

    def purge_horizon(self, scope: str) -> int:
        raw = self._txn.get(_s(scope), db=self._db["horizons"])
        return 0 if raw is None else _from_u64(raw)

    def index_range(self, scope: str, after_q: int, limit: int) -> list[tuple[int, str, str]]:
        prefix = _s(scope) + _SEP
        plen = len(prefix)
        out: list[tuple[int, str, str]] = []
        if limit <= 0:
            return out
        with self._txn.cursor(db=self._db["index"]) as cur:
            if not cur.set_range(prefix + _u64(after_q + 1)):
                return out
            for key, value in cur:
                if key[:plen] != prefix:
                    break
                c, _, k = value.partition(_SEP)
                out.append((_from_u64(key[plen:]), c.decode(), k.decode()))
                if len(out) >= limit:
                    break
        return out

    def tombs(self, scope: str, limit: int) -> list[Tomb]:
        prefix = _s(scope) + _SEP
        plen = len(prefix)
        out: list[Tomb] = []
        with self._txn.cursor(db=self._db["tombs"]) as cur:
            if not cur.set_range(prefix):
                return out
            for key, value in cur:
                if key[:plen] != prefix or len(out) >= limit:
                    break
                c, k, t_ms = orjson.loads(value)
                out.append(Tomb(scope, _from_u64(key[plen:]), c, k, t_ms))
        return out

    # --- outcomes

    def get_outcome(self, ns: str, n: int) -> OutcomeRow | None:
        raw = self._txn.get(ns.encode() + _SEP + _U64.pack(n), db=self._db["outcomes"])
        if raw is None:
            return None
        c, k, a, b, *rest = orjson.loads(raw)
        d = rest[0] if rest else ""
        if isinstance(b, int):
            return OutcomeRow(c, k, scope=a, q=b, d=d)
        return OutcomeRow(c, k, code=a, reason=b, d=d)

    # --- conflicts

    def get_conflict(self, cid: int) -> ConflictRow | None:
        return lmdb_conflicts.get(self._txn, self._db, cid)

    def conflicts(self, *, open_only: bool, limit: int) -> list[ConflictRow]:
        return lmdb_conflicts.rows(self._txn, self._db, open_only=open_only, limit=limit)

    def open_conflicts_on(self, c: str, k: str, fname: str) -> list[int]:
        return lmdb_conflicts.open_on(self._txn, self._db, c, k, fname)

    # --- dead letters, commands, notices

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        return lmdb_letters.newest(self._txn, self._db, limit)

    def dead_letter_stats(self) -> DeadLetterStats:
        return lmdb_letters.stats(self._txn, self._db)

    def get_dead_letter(self, lid: int) -> DeadLetter | None:
        return lmdb_letters.get(self._txn, self._db, lid)

    def commands(self, dev: str | None = None) -> list[CommandRow]:
        rows: list[CommandRow] = []
        with self._txn.cursor(db=self._db["commands"]) as cur:
            if dev is None:
                rows = [CommandRow.from_json(orjson.loads(v)) for _, v in cur]
            else:
                prefix = _s(dev) + _SEP
                if cur.set_range(prefix):
                    for key, value in cur:
                        if not key.startswith(prefix):
                            break
                        rows.append(CommandRow.from_json(orjson.loads(value)))
        rows.sort(key=lambda r: (r.created_ms, r.id))
        return rows

    def notices(self, limit: int) -> list[Notice]:
        out: list[Notice] = []
        with self._txn.cursor(db=self._db["notices"]) as cur:
            for key, value in cur:
                if len(out) >= limit:
                    break
                scope, q, rec = orjson.loads(value)
                out.append(Notice(_from_u64(key), scope, q, rec))
        return out

    def schema_versions(self) -> list[SchemaVersionRow]:
        with self._txn.cursor(db=self._db["schemas"]) as cur:
            return [SchemaVersionRow.from_json(orjson.loads(v)) for _, v in cur]

    def login_removals(self) -> list[LoginRemoval]:
        return lmdb_removals.all_rows(self._txn, self._db)

    def get_login_removal(self, dev: str) -> LoginRemoval | None:
        return lmdb_removals.get(self._txn, self._db, dev)

    def servers(self) -> list[ServerRow]:
        return lmdb_servers.all_rows(self._txn, self._db)

    def counts(self) -> dict[str, int]:
        def n(name: str) -> int:
            return int(self._txn.stat(self._db[name])["entries"])
        return {"records": n("records"), "devices": n("devices"), "outcomes": n("outcomes"),
                "conflicts": n("conflicts"), "open_conflicts": n("conflicts_open"),
                "dead_letters": n("deadletters"), "commands": n("commands"),
                "notices": n("notices"), "tombstones": n("tombs")}


class LmdbWriteTxn(LmdbReadTxn):
    """WriteTxn over one LMDB write transaction."""

    __slots__ = ("_limits", "_seqs", "_seqs_dirty")

    def __init__(self, txn: lmdb.Transaction[bytes], dbs: dict[str, Any],
                 limits: DeadLetterLimits) -> None:
        super().__init__(txn, dbs)
        self._limits = limits
        self._seqs: dict[str, int] = {}  # sequences read or written in this transaction
        self._seqs_dirty: set[str] = set()  # allocated here, written back by `finish`

    def lock_scopes(self, scopes: Iterable[str]) -> None:
        """Nothing to do: LMDB has one writer at a time."""

    def guard_schema(self) -> int:
        """One writer at a time (across processes too): nothing can commit before us."""
        return self.registry_generation()

    def lock_schema(self) -> None:
        """Nothing to do: LMDB has one writer at a time."""

    def prefetch(self, ns: str, numbers: Iterable[int],
                 keys: Iterable[tuple[str, str]]) -> None:
        """Nothing to do: reads are memory-mapped."""

    # --- registry

    def put_device(self, row: DeviceRow) -> None:
        self._txn.put(_s(row.id), orjson.dumps(row.to_json()), db=self._db["devices"])

    def delete_device(self, dev: str) -> bool:
        return bool(self._txn.delete(_s(dev), db=self._db["devices"]))

    def bump_registry(self) -> int:
        gen = self.registry_generation() + 1
        self._txn.put(b"registry", _u64(gen), db=self._db["meta"])
        return gen

    # --- records and the log

    def put_record(self, c: str, k: str, state: dict[str, Any] | bytes) -> None:
        data = state if isinstance(state, bytes) else orjson.dumps(state)
        self._txn.put(f"{c}\0{k}".encode(), data, db=self._db["records"])

    def delete_record(self, c: str, k: str) -> None:
        self._txn.delete(_s(c) + _SEP + _s(k), db=self._db["records"])

    def scope_seq(self, scope: str) -> int:
        q = self._seqs.get(scope)
        if q is None:
            q = self._seqs[scope] = super().scope_seq(scope)
        return q

    def allocate_seq(self, scope: str) -> int:
        q = self.scope_seq(scope) + 1
        self._seqs[scope] = q
        self._seqs_dirty.add(scope)  # one write per scope at the end, not one per change
        return q

    def scope_seqs(self) -> dict[str, int]:
        self.finish()
        return super().scope_seqs()

    def finish(self) -> None:
        """Write what this transaction keeps in memory (the allocated sequences); the
        store calls it before committing."""
        if self._seqs_dirty:
            db = self._db["seqs"]
            for scope in self._seqs_dirty:
                self._txn.put(_s(scope), _u64(self._seqs[scope]), db=db)
            self._seqs_dirty.clear()

    def index_move(self, scope: str, old_q: int, new_q: int, c: str, k: str) -> None:
        prefix = f"{scope}\0".encode()
        db = self._db["index"]
        if old_q:
            self._txn.delete(prefix + _U64.pack(old_q), db=db)
        self._txn.put(prefix + _U64.pack(new_q), f"{c}\0{k}".encode(), db=db)

    def index_delete(self, scope: str, q: int) -> None:
        self._txn.delete(_s(scope) + _SEP + _u64(q), db=self._db["index"])

    def set_purge_horizon(self, scope: str, q: int) -> None:
        self._txn.put(_s(scope), _u64(q), db=self._db["horizons"])

    def jump_scope_seq(self, scope: str, q: int) -> None:
        """Move the scope's sequence forward to `q` (a restore: see `restore_backup`)."""
        if q < self.scope_seq(scope):
            raise ValueError(f"scope {scope!r}: a sequence only moves forward")
        self._seqs[scope] = q
        self._seqs_dirty.add(scope)

    def put_tomb(self, tomb: Tomb) -> None:
        self._txn.put(_s(tomb.scope) + _SEP + _u64(tomb.q),
                      orjson.dumps([tomb.c, tomb.k, tomb.t_ms]), db=self._db["tombs"])

    def delete_tomb(self, scope: str, q: int) -> None:
        self._txn.delete(_s(scope) + _SEP + _u64(q), db=self._db["tombs"])

    # --- outcomes

    def put_outcome(self, ns: str, n: int, outcome: OutcomeRow) -> None:
        value: list[str | int]
        if outcome.code:
            value = [outcome.c, outcome.k, outcome.code, outcome.reason, outcome.d]
        else:
            value = [outcome.c, outcome.k, outcome.scope, outcome.q, outcome.d]
        self._txn.put(ns.encode() + _SEP + _U64.pack(n), orjson.dumps(value),
                      db=self._db["outcomes"])

    def delete_outcomes(self, dev: str) -> int:
        # The legacy namespace (the id alone) and every incarnation's ("id/inc").
        return (self._delete_prefix("outcomes", _s(dev) + _SEP)
                + self._delete_prefix("outcomes", _s(dev + NS_SEP)))

    # --- conflicts

    def add_conflict(self, row: ConflictRow) -> int:
        cid = self._next_id("conflicts")
        lmdb_conflicts.put_new(self._txn, self._db, cid, row)
        return cid

    def close_conflict(self, cid: int, closed_ms: int, resolution: str) -> bool:
        return lmdb_conflicts.close(self._txn, self._db, cid, closed_ms, resolution)

    def trim_conflicts(self, before_ms: int, keep_closed: int, limit: int = 10_000) -> int:
        return lmdb_conflicts.trim(self._txn, self._db, before_ms, keep_closed, limit)

    # --- dead letters, commands, notices

    def add_dead_letter(self, letter: DeadLetter) -> int:
        lid = self._next_id("deadletters")
        lmdb_letters.add(self._txn, self._db, self._limits, lid, letter)
        return lid

    def trim_dead_letters(self, now_ms: int) -> int:
        return lmdb_letters.trim(self._txn, self._db, self._limits, now_ms)

    def delete_dead_letter(self, lid: int) -> bool:
        return lmdb_letters.delete(self._txn, self._db, lid)

    def delete_dead_letters_of(self, dev: str) -> int:
        return lmdb_letters.delete_of(self._txn, self._db, dev)

    def put_command(self, row: CommandRow) -> None:
        self._txn.put(_s(row.device) + _SEP + _s(row.id), orjson.dumps(row.to_json()),
                      db=self._db["commands"])

    def delete_commands(self, dev: str) -> int:
        return self._delete_prefix("commands", _s(dev) + _SEP)

    def put_login_removal(self, row: LoginRemoval) -> None:
        lmdb_removals.put(self._txn, self._db, row)

    def delete_login_removal(self, dev: str) -> bool:
        return lmdb_removals.delete(self._txn, self._db, dev)

    def put_server(self, row: ServerRow) -> None:
        lmdb_servers.put(self._txn, self._db, row)

    def delete_server(self, server_id: str) -> bool:
        return lmdb_servers.delete(self._txn, self._db, server_id)

    def add_notice(self, notice: Notice) -> int:
        nid = self._next_id("notices")
        self._txn.put(_u64(nid), orjson.dumps([notice.scope, notice.q, notice.rec]),
                      db=self._db["notices"])
        return nid

    def delete_notice(self, nid: int) -> None:
        self._txn.delete(_u64(nid), db=self._db["notices"])

    def put_schema_version(self, row: SchemaVersionRow) -> None:
        self._txn.put(_u64(row.version), orjson.dumps(row.to_json()), db=self._db["schemas"])

    # --- helpers

    def _next_id(self, name: str) -> int:
        """Ids grow forever: the next one is kept in meta (never reused after deletes)."""
        key = b"next:" + name.encode()
        raw = self._txn.get(key, db=self._db["meta"])
        nid = 1 if raw is None else _from_u64(raw)
        self._txn.put(key, _u64(nid + 1), db=self._db["meta"])
        return nid

    def _delete_prefix(self, name: str, prefix: bytes) -> int:
        count = 0
        with self._txn.cursor(db=self._db[name]) as cur:
            if not cur.set_range(prefix):
                return 0
            while cur.key().startswith(prefix):
                count += 1
                if not cur.delete():
                    break
        return count


__all__ = ["DBS", "DEFAULT_MAX_DEAD_LETTERS", "LmdbReadTxn", "LmdbWriteTxn"]
