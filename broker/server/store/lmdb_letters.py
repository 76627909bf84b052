"""The dead letters of the LMDB store, and their bounds (`DeadLetterLimits`).

Layout (in `broker.server.store.lmdb_txn`'s tables):

    deadletters   id -> u32 header length, JSON header, raw payload (<= 64 KiB)
    meta          b"dl:bytes", b"dl:truncated"       totals of the letters kept
                  b"dl:dropped", b"dl:dropped_bytes"  what the bounds dropped, ever

Ids grow with time, so the oldest letter is the first key. Every insert drops the
oldest letters beyond the count, byte and age bounds (the letter's time being now), so
the store never holds more than the bounds between two inserts; `trim` applies the age
bound when no letter arrives. A store written before the totals were kept gets them
counted from its letters at the first use.
"""

from __future__ import annotations

import struct
from typing import Any, TypeAlias

import lmdb
import orjson

from broker.server.store.base import (
    MAX_DEAD_LETTER_RAW,
    DeadLetter,
    DeadLetterLimits,
    DeadLetterStats,
    dead_letter_bytes,
)

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_BYTES, _TRUNCATED = b"dl:bytes", b"dl:truncated"
_DROPPED, _DROPPED_BYTES = b"dl:dropped", b"dl:dropped_bytes"

Txn: TypeAlias = "lmdb.Transaction[bytes]"
Dbs: TypeAlias = dict[str, Any]


def decode(lid: int, value: bytes) -> DeadLetter:
    (hlen,) = _U32.unpack(value[:4])
    head = orjson.loads(value[4:4 + hlen])
    return DeadLetter(id=lid, t_ms=head["t"], device=head["dev"], topic=head["topic"],
                      code=head["code"], reason=head["reason"], raw=bytes(value[4 + hlen:]),
                      size=head["size"])


def newest(txn: Txn, dbs: Dbs, limit: int) -> list[DeadLetter]:
    """Up to `limit` letters, newest first."""
    out: list[DeadLetter] = []
    with txn.cursor(db=dbs["deadletters"]) as cur:
        if not cur.last():
            return out
        for key, value in cur.iterprev():
            if len(out) >= limit:
                break
            out.append(decode(_U64.unpack(key)[0], value))
    return out


def stats(txn: Txn, dbs: Dbs) -> DeadLetterStats:
    size, truncated = _totals(txn, dbs)
    db = dbs["deadletters"]
    oldest = 0
    with txn.cursor(db=db) as cur:
        if cur.first():
            oldest = decode(_U64.unpack(cur.key())[0], cur.value()).t_ms
    return DeadLetterStats(count=int(txn.stat(db)["entries"]), bytes=size,
                           truncated=truncated, oldest_ms=oldest,
                           dropped=_meta(txn, dbs, _DROPPED),
                           dropped_bytes=_meta(txn, dbs, _DROPPED_BYTES))


def add(txn: Txn, dbs: Dbs, limits: DeadLetterLimits, lid: int, letter: DeadLetter) -> None:
    """Store `letter` as `lid` (raw cut to 64 KiB), then apply the bounds."""
    raw = bytes(letter.raw[:MAX_DEAD_LETTER_RAW])
    size = letter.size or len(letter.raw)
    head = orjson.dumps({"t": letter.t_ms, "dev": letter.device, "topic": letter.topic,
                         "code": letter.code, "reason": letter.reason, "size": size})
    total, truncated = _totals(txn, dbs)
    txn.put(_U64.pack(lid), _U32.pack(len(head)) + head + raw, db=dbs["deadletters"])
    kept = DeadLetter(lid, letter.t_ms, letter.device, letter.topic, letter.code,
                      letter.reason, raw, size)
    _trim(txn, dbs, limits, total + dead_letter_bytes(kept),
          truncated + (size > len(raw)), letter.t_ms)


def get(txn: Txn, dbs: Dbs, lid: int) -> DeadLetter | None:
    value = txn.get(_U64.pack(lid), db=dbs["deadletters"])
    return None if value is None else decode(lid, value)


def delete(txn: Txn, dbs: Dbs, lid: int) -> bool:
    """Remove letter `lid` (the operator discarded or retried it): not a drop by the
    bounds, so only the totals of the letters kept change. False if it is unknown."""
    letter = get(txn, dbs, lid)
    if letter is None:
        return False
    total, truncated = _totals(txn, dbs)
    txn.delete(_U64.pack(lid), db=dbs["deadletters"])
    _set_totals(txn, dbs, total - dead_letter_bytes(letter),
                truncated - (letter.size > len(letter.raw)))
    return True


def delete_of(txn: Txn, dbs: Dbs, device: str) -> int:
    """Remove every letter of `device` (one pass over the letters, which the bounds
    keep at most `DeadLetterLimits.max_count`); how many."""
    total, truncated = _totals(txn, dbs)
    count = 0
    with txn.cursor(db=dbs["deadletters"]) as cur:
        if not cur.first():
            return 0
        while cur.key():
            value = cur.value()
            (hlen,) = _U32.unpack(value[:4])
            if orjson.loads(value[4:4 + hlen])["dev"] != device:
                if not cur.next():
                    break
                continue
            letter = decode(_U64.unpack(cur.key())[0], value)
            total -= dead_letter_bytes(letter)
            truncated -= letter.size > len(letter.raw)
            count += 1
            if not cur.delete():  # deleting moves the cursor to the next letter
                break
    _set_totals(txn, dbs, total, truncated)
    return count


def _set_totals(txn: Txn, dbs: Dbs, total: int, truncated: int) -> None:
    txn.put(_BYTES, _U64.pack(max(0, total)), db=dbs["meta"])
    txn.put(_TRUNCATED, _U64.pack(max(0, truncated)), db=dbs["meta"])


def trim(txn: Txn, dbs: Dbs, limits: DeadLetterLimits, now_ms: int) -> int:
    """Drop the oldest letters beyond the bounds at `now_ms`; how many were dropped."""
    return _trim(txn, dbs, limits, *_totals(txn, dbs), now_ms)


def _trim(txn: Txn, dbs: Dbs, limits: DeadLetterLimits, total: int, truncated: int,
          now_ms: int) -> int:
    db = dbs["deadletters"]
    excess = int(txn.stat(db)["entries"]) - limits.max_count
    cutoff = now_ms - limits.max_age_ms
    dropped = dropped_bytes = 0
    with txn.cursor(db=db) as cur:
        cur.first()
        while cur.key():
            value = cur.value()
            if excess <= 0 and total <= limits.max_bytes and _time(value) >= cutoff:
                break  # (the usual case: only the oldest letter's header was read)
            letter = decode(_U64.unpack(cur.key())[0], value)
            size = dead_letter_bytes(letter)
            if not cur.delete():  # deleting moves the cursor to the next letter
                break
            excess -= 1
            total -= size
            truncated -= letter.size > len(letter.raw)
            dropped += 1
            dropped_bytes += size
    meta = dbs["meta"]
    txn.put(_BYTES, _U64.pack(max(0, total)), db=meta)
    txn.put(_TRUNCATED, _U64.pack(max(0, truncated)), db=meta)
    if dropped:
        txn.put(_DROPPED, _U64.pack(_meta(txn, dbs, _DROPPED) + dropped), db=meta)
        txn.put(_DROPPED_BYTES, _U64.pack(_meta(txn, dbs, _DROPPED_BYTES) + dropped_bytes),
                db=meta)
    return dropped


def _time(value: bytes) -> int:
    (hlen,) = _U32.unpack(value[:4])
    return int(orjson.loads(value[4:4 + hlen])["t"])


def _meta(txn: Txn, dbs: Dbs, key: bytes) -> int:
    raw = txn.get(key, db=dbs["meta"])
    return 0 if raw is None else int(_U64.unpack(raw)[0])


def _totals(txn: Txn, dbs: Dbs) -> tuple[int, int]:
    """(bytes, truncated) of the letters kept."""
    raw = txn.get(_BYTES, db=dbs["meta"])
    if raw is not None:
        return int(_U64.unpack(raw)[0]), _meta(txn, dbs, _TRUNCATED)
    size = truncated = 0
    with txn.cursor(db=dbs["deadletters"]) as cur:
        for key, value in cur:
            letter = decode(_U64.unpack(key)[0], value)
            size += dead_letter_bytes(letter)
            truncated += letter.size > len(letter.raw)
    return size, truncated


__all__ = ["add", "decode", "delete", "delete_of", "get", "newest", "stats", "trim"]
