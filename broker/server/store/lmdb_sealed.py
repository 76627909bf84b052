"""Encryption at rest of the LMDB server store: a transaction (and its cursors) that
seals the values of some databases on the way in and opens them on the way out, so the
table code (`lmdb_txn`, `lmdb_letters`) stays the same with encryption on or off.

Sealed: the values of `SEALED` -- the records (device data), the conflict log, the dead
letters (raw device messages) and the pending notices (record states). Keys stay plain
(collection names, record keys, ids), as do the registry, sequences, the scope index,
tombstones, outcomes and commands. Each value is AES-256-GCM sealed with
``db name NUL key`` as associated data (`waystation.atrest.rewrite.aad`): a value copied
to another key does not open.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lmdb

from waystation.atrest.rewrite import Sealer, aad

SEALED = ("records", "conflicts", "deadletters", "notices")


class SealedTxn:
    """An lmdb.Transaction whose values in the sealed databases are encrypted."""

    __slots__ = ("_cipher", "_names", "_txn")

    def __init__(self, txn: lmdb.Transaction[bytes], sealed: dict[int, str],
                 cipher: Sealer) -> None:
        self._txn = txn
        self._names = sealed  # id(db handle) -> database name
        self._cipher = cipher

    def get(self, key: bytes, default: Any = None, db: Any = None) -> Any:
        raw = self._txn.get(key, default, db=db)
        name = self._names.get(id(db))
        if name is None or raw is None or raw is default:
            return raw
        return self._cipher.open(aad(name, key), raw)

    def put(self, key: bytes, value: bytes, db: Any = None, **kw: Any) -> bool:
        name = self._names.get(id(db))
        if name is not None:
            value = self._cipher.seal(aad(name, key), bytes(value))
        return bool(self._txn.put(key, value, db=db, **kw))

    def cursor(self, db: Any = None) -> Any:
        cur = self._txn.cursor(db=db)
        name = self._names.get(id(db))
        return cur if name is None else SealedCursor(cur, name, self._cipher)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._txn, attr)  # delete, stat, drop, commit, abort, ...


class SealedCursor:
    """A cursor of a sealed database: values come out opened."""

    __slots__ = ("_cipher", "_cur", "_name")

    def __init__(self, cur: lmdb.Cursor[bytes], name: str, cipher: Sealer) -> None:
        self._cur = cur
        self._name = name
        self._cipher = cipher

    def _open(self, key: bytes, raw: bytes) -> bytes:
        return self._cipher.open(aad(self._name, key), raw) if key else raw

    def __enter__(self) -> SealedCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cur.close()

    def value(self) -> bytes:
        return self._open(self._cur.key(), self._cur.value())

    def item(self) -> tuple[bytes, bytes]:
        key, raw = self._cur.item()
        return key, self._open(key, raw)

    def _iter(self, items: Iterator[tuple[bytes, bytes]], keys: bool,
              values: bool) -> Iterator[Any]:
        for key, raw in items:
            if keys and values:
                yield key, self._open(key, raw)
            elif values:
                yield self._open(key, raw)
            else:
                yield key

    def iternext(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        return self._iter(self._cur.iternext(keys=True, values=True), keys, values)

    def iterprev(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        return self._iter(self._cur.iterprev(keys=True, values=True), keys, values)

    def __iter__(self) -> Iterator[Any]:
        return self.iternext()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._cur, attr)  # set_range, first, last, next, key, delete, ...


__all__ = ["SEALED", "SealedCursor", "SealedTxn"]
