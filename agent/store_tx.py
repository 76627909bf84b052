"""One transaction on the agent's LMDB store (`agent.store`): typed helpers over the raw
LMDB transaction -- orjson values, and AES-GCM sealing of the values of `ENCRYPTED_DBS`
when the store is encrypted (the database name and key are the associated data, so a
value cannot be moved to another key unnoticed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lmdb
import orjson

from agent.crypto import ValueCipher

ENCRYPTED_DBS = frozenset({"view", "base", "stamps", "outbox", "deadletters", "conflicts",
                           "journal", "idem"})
"""The databases whose values are sealed on an encrypted store (see `agent.store`)."""


class ValueUnreadable(Exception):
    """A value this agent stored does not read back as JSON: the page holding it was
    damaged (zeroed or overwritten by a failing card; LMDB has no checksums). The store
    turns it into StoreDamaged, naming its file (`agent.store`)."""

    def __init__(self, db: str, key: bytes, exc: Exception) -> None:
        super().__init__(f"a stored value of database {db} does not read back ({exc})")


class Tx:
    """One LMDB transaction with typed helpers (orjson values, encryption when on)."""

    __slots__ = ("_cipher", "_dbs", "_txn", "write")

    def __init__(self, dbs: dict[str, Any], cipher: ValueCipher | None,
                 txn: lmdb.Transaction[bytes], write: bool) -> None:
        self._txn = txn
        self._dbs = dbs
        self._cipher = cipher
        self.write = write

    def _decode(self, db: str, key: bytes, raw: bytes) -> Any:
        if self._cipher is not None and db in ENCRYPTED_DBS:
            raw = self._cipher.open(db.encode() + b"\0" + key, raw)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueUnreadable(db, key, exc) from None

    def _encode(self, db: str, key: bytes, value: Any) -> bytes:
        raw = orjson.dumps(value)
        if self._cipher is not None and db in ENCRYPTED_DBS:
            return self._cipher.seal(db.encode() + b"\0" + key, raw)
        return raw

    def get(self, db: str, key: bytes) -> Any:
        """The decoded value at `key`, or None."""
        raw = self._txn.get(key, db=self._dbs[db])
        if raw is None:
            return None
        if self._cipher is not None and db in ENCRYPTED_DBS:
            raw = self._cipher.open(db.encode() + b"\0" + key, raw)
        try:
            return orjson.loads(raw)  # _decode, inlined: the hot path
        except orjson.JSONDecodeError as exc:
            raise ValueUnreadable(db, key, exc) from None

    def put(self, db: str, key: bytes, value: Any) -> int:
        """Store `value`; returns the size of its JSON (before any sealing)."""
        raw = orjson.dumps(value)  # _encode, inlined: the hot path
        size = len(raw)
        if self._cipher is not None and db in ENCRYPTED_DBS:
            raw = self._cipher.seal(db.encode() + b"\0" + key, raw)
        self._txn.put(key, raw, db=self._dbs[db])
        return size

    def raw(self, db: str, key: bytes) -> bytes | None:
        """The stored bytes at `key`, not decoded (only for a database that is never
        encrypted: for a cache keyed on what is stored)."""
        assert db not in ENCRYPTED_DBS
        raw: bytes | None = self._txn.get(key, db=self._dbs[db])
        return raw

    def has(self, db: str, key: bytes) -> bool:
        return self._txn.get(key, db=self._dbs[db]) is not None

    def put_raw(self, db: str, key: bytes, value: bytes = b"") -> None:
        """Store bytes as they are (index entries); never encrypted."""
        self._txn.put(key, value, db=self._dbs[db])

    def delete(self, db: str, key: bytes) -> bool:
        return bool(self._txn.delete(key, db=self._dbs[db]))

    def count(self, db: str) -> int:
        return int(self._txn.stat(self._dbs[db])["entries"])

    def live_bytes(self) -> int:
        """Bytes in the pages that hold data now, over every database. Unlike the file's
        size (LMDB never shrinks it, and reuses freed pages), this falls when records
        are evicted: the disk quota (agent.quota) is measured with it."""
        total = 0
        psize = 4096
        for handle in self._dbs.values():
            st = self._txn.stat(handle)
            psize = int(st["psize"])
            total += int(st["branch_pages"]) + int(st["leaf_pages"]) + int(st["overflow_pages"])
        return total * psize

    def clear(self, db: str) -> None:
        """Delete every entry of `db` (the database itself stays)."""
        self._txn.drop(self._dbs[db], delete=False)

    def cursor(self, db: str) -> lmdb.Cursor[bytes]:
        """A raw LMDB cursor on `db` (keys as stored; values NOT decoded). Use it as a
        context manager, for scans that seek (e.g. skipping runs of keys)."""
        return self._txn.cursor(db=self._dbs[db])

    def keys(self, db: str, prefix: bytes = b"", *, start: bytes | None = None) -> Iterator[bytes]:
        """Keys with `prefix` in order, from `start` (inclusive) if given."""
        with self._txn.cursor(db=self._dbs[db]) as cur:
            if not cur.set_range(start if start is not None else prefix):
                return
            while True:
                key = cur.key()
                if not key.startswith(prefix):
                    return
                yield key
                if not cur.next():
                    return

    def items(self, db: str, prefix: bytes = b"", *,
              start: bytes | None = None) -> Iterator[tuple[bytes, Any]]:
        """(key, decoded value) with `prefix` in key order, from `start` if given."""
        with self._txn.cursor(db=self._dbs[db]) as cur:
            if not cur.set_range(start if start is not None else prefix):
                return
            while True:
                key, raw = cur.item()
                if not key.startswith(prefix):
                    return
                yield key, self._decode(db, key, raw)
                if not cur.next():
                    return

    def first(self, db: str) -> tuple[bytes, Any] | None:
        with self._txn.cursor(db=self._dbs[db]) as cur:
            if not cur.first():
                return None
            key, raw = cur.item()
            return key, self._decode(db, key, raw)

    def last_key(self, db: str) -> bytes | None:
        with self._txn.cursor(db=self._dbs[db]) as cur:
            return cur.key() if cur.last() else None

    def meta(self, name: str, default: Any = None) -> Any:
        value = self.get("meta", name.encode())
        return default if value is None else value

    def set_meta(self, name: str, value: Any) -> None:
        self.put("meta", name.encode(), value)


__all__ = ["ENCRYPTED_DBS", "Tx"]
