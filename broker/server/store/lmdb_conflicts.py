"""The LMDB tables of the conflict log (`base.ConflictRow`).

    conflicts       u64 id -> JSON ConflictRow (its `id` included)
    conflicts_open  c \\0 k \\0 field \\0 u64 id -> b""  (the open ones, by the field they hold)

Ids come from the store's counters (`LmdbWriteTxn._next_id`); these functions only read
and write the two tables inside the caller's transaction.
"""

from __future__ import annotations

from typing import Any

import lmdb
import orjson

from broker.server.store.lmdb_bytes import SEP as _SEP
from broker.server.store.lmdb_bytes import from_u64 as _from_u64
from broker.server.store.lmdb_bytes import text as _s
from broker.server.store.lmdb_bytes import u64 as _u64
from broker.server.store.rows import ConflictRow


def open_key(c: str, k: str, fname: str, cid: int) -> bytes:
    return _s(c) + _SEP + _s(k) + _SEP + _s(fname) + _SEP + _u64(cid)


def get(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], cid: int) -> ConflictRow | None:
    raw = txn.get(_u64(cid), db=dbs["conflicts"])
    return None if raw is None else ConflictRow.from_json(orjson.loads(raw))


def rows(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], *, open_only: bool,
         limit: int) -> list[ConflictRow]:
    """The newest `limit` entries (only the open ones with `open_only`), newest first."""
    out: list[ConflictRow] = []
    if open_only:
        ids = sorted((_from_u64(k[-8:]) for k, _ in txn.cursor(db=dbs["conflicts_open"])),
                     reverse=True)
        for cid in ids[:limit]:
            row = get(txn, dbs, cid)
            if row is not None:
                out.append(row)
        return out
    with txn.cursor(db=dbs["conflicts"]) as cur:
        for _, value in cur.iterprev(keys=True, values=True):
            if len(out) >= limit:
                break
            out.append(ConflictRow.from_json(orjson.loads(value)))
    return out


def open_on(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], c: str, k: str,
            fname: str) -> list[int]:
    """The ids of the open conflicts on field `fname` of record (`c`, `k`)."""
    prefix = _s(c) + _SEP + _s(k) + _SEP + _s(fname) + _SEP
    out: list[int] = []
    with txn.cursor(db=dbs["conflicts_open"]) as cur:
        if not cur.set_range(prefix):
            return out
        for key in cur.iternext(keys=True, values=False):
            if not key.startswith(prefix) or len(key) != len(prefix) + 8:
                break
            out.append(_from_u64(key[-8:]))
    return out


def put_new(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], cid: int,
            row: ConflictRow) -> None:
    data = row.to_json()
    data["id"] = cid
    txn.put(_u64(cid), orjson.dumps(data), db=dbs["conflicts"])
    if row.open:
        txn.put(open_key(row.c, row.k, row.field, cid), b"", db=dbs["conflicts_open"])


def close(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], cid: int, closed_ms: int,
          resolution: str) -> bool:
    row = get(txn, dbs, cid)
    if row is None or not row.open:
        return False
    data = row.to_json()
    data.update(open=False, closed=closed_ms, resolution=resolution)
    txn.put(_u64(cid), orjson.dumps(data), db=dbs["conflicts"])
    txn.delete(open_key(row.c, row.k, row.field, cid), db=dbs["conflicts_open"])
    return True


def trim(txn: lmdb.Transaction[bytes], dbs: dict[str, Any], before_ms: int, keep_closed: int,
         limit: int) -> int:
    """Delete closed entries older than `before_ms`, and the oldest closed ones beyond
    `keep_closed`; at most `limit` per call (and 10 x `limit` entries looked at)."""
    db = dbs["conflicts"]
    closed = (int(txn.stat(db)["entries"]) - int(txn.stat(dbs["conflicts_open"])["entries"]))
    excess = max(0, closed - keep_closed)  # the oldest closed ones past the bound
    doomed: list[bytes] = []
    scanned = 0
    with txn.cursor(db=db) as cur:
        for key, raw in cur:
            scanned += 1
            if len(doomed) >= limit or scanned > 10 * limit:
                break
            data = orjson.loads(raw)
            if data["open"]:
                continue
            if excess > 0 or max(data["created"], data["closed"]) < before_ms:
                doomed.append(key)
            excess -= 1
    for key in doomed:
        txn.delete(key, db=db)
    return len(doomed)


__all__ = ["close", "get", "open_key", "open_on", "put_new", "rows", "trim"]
