"""Rewriting every value of some LMDB databases with another cipher, in place and
resumably (`waystation agent encrypt` / `decrypt`, `waystation server encrypt` / ...).

The progress is a *marker* in the environment's meta database: which conversion runs
(``from``/``to``), the check token of the new key (``check``), the database being
converted (``db``, an index into the list) and the last key converted there (``after``).
Each batch converts up to `batch` values and moves the marker forward **in the same
LMDB transaction**, so after a crash (kill -9, power loss) every value before the marker
is in the new form and every value after it in the old one: the conversion resumes
where the last committed batch ended and never sees a value twice. Nothing else may
write the databases meanwhile (the callers hold the service lock and a sentinel file).

Values are sealed with ``db name + NUL + key`` as associated data (as the stores do), so
a value moved to another key fails to open.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import lmdb
import orjson

KILL_POINT_ENV = "WAYSTATION_TEST_KILL_AT"
"""Fault injection for the crash tests: ``<point>`` or ``<point>:<n>`` makes the process
SIGKILL itself when it reaches that point (the n-th time), like a power loss there."""

_MB = 1 << 20


class Sealer(Protocol):
    """What the rewrite needs of a cipher (`agent.crypto.ValueCipher` is one)."""

    def seal(self, aad: bytes, plaintext: bytes) -> bytes: ...

    def open(self, aad: bytes, sealed: bytes) -> bytes: ...


def aad(db: str, key: bytes) -> bytes:
    """The associated data a value of `db` at `key` is sealed with."""
    return db.encode() + b"\0" + key


_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here if the crash tests asked for it (`KILL_POINT_ENV`)."""
    want = os.environ.get(KILL_POINT_ENV)
    if not want:
        return
    point, _, nth = want.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= (int(nth) if nth.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Env:
    """An open environment and what the rewrite touches in it."""

    env: lmdb.Environment
    dbs: dict[str, Any]
    """database name -> handle, the meta database included"""
    meta_db: str
    marker_key: bytes
    max_map_size: int


def read_marker(target: Env) -> dict[str, Any] | None:
    with target.env.begin(db=target.dbs[target.meta_db]) as txn:
        raw = txn.get(target.marker_key)
    return None if raw is None else dict(orjson.loads(raw))


def write(target: Env, fn: Callable[[lmdb.Transaction[bytes]], object]) -> None:
    """Run `fn` in one durable write transaction, growing the map when it is full."""
    while True:
        txn = target.env.begin(write=True)
        try:
            fn(txn)
            txn.commit()
        except lmdb.MapFullError:
            txn.abort()
            current = int(target.env.info()["map_size"])
            if current >= target.max_map_size:
                raise
            target.env.set_mapsize(min(current * 2, target.max_map_size))
            continue
        except BaseException:
            txn.abort()
            raise
        target.env.sync(True)
        return


def start(target: Env, marker: dict[str, Any]) -> None:
    """Record the conversion about to run (before any value changes)."""
    doc = {**marker, "db": 0, "after": None, "done": 0}
    write(target, lambda txn: txn.put(target.marker_key, orjson.dumps(doc),
                                       db=target.dbs[target.meta_db]))


def convert(target: Env, names: Sequence[str], old: Sealer | None, new: Sealer | None, *,
            batch: int = 1000, progress: Callable[[int], None] | None = None) -> int:
    """Convert every value of `names` from `old` to `new` (None: plain text), from the
    marker on; returns how many values this call converted. The marker must exist."""
    converted = 0
    while True:
        marker = read_marker(target)
        if marker is None:
            raise RuntimeError("no conversion marker: call start() first")
        if marker["db"] >= len(names):
            return converted
        count = 0

        def step(txn: lmdb.Transaction[bytes], marker: dict[str, Any] = marker) -> None:
            nonlocal count
            count = 0
            name = names[marker["db"]]
            db = target.dbs[name]
            after = None if marker["after"] is None else bytes.fromhex(marker["after"])
            last = after
            with txn.cursor(db=db) as cur:
                found = cur.set_range(after) if after is not None else cur.first()
                if found and after is not None and cur.key() == after:
                    found = cur.next()
                pending: list[tuple[bytes, bytes]] = []
                while found and len(pending) < batch:
                    key, raw = cur.item()
                    value = raw if old is None else old.open(aad(name, key), raw)
                    pending.append((key, value if new is None
                                    else new.seal(aad(name, key), value)))
                    found = cur.next()
            for key, value in pending:
                txn.put(key, value, db=db)
                last = key
            count = len(pending)
            doc = dict(marker)
            doc["done"] = int(marker.get("done", 0)) + count
            if found:
                doc["after"] = None if last is None else last.hex()
            else:
                doc["db"], doc["after"] = marker["db"] + 1, None
            txn.put(target.marker_key, orjson.dumps(doc), db=target.dbs[target.meta_db])

        write(target, step)
        converted += count
        if progress is not None:
            progress(converted)
        kill_point("batch")


__all__ = ["KILL_POINT_ENV", "Env", "Sealer", "aad", "convert", "kill_point", "read_marker",
           "start", "write"]
