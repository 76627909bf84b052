"""Idempotency keys of local writes: a write sent again with the same key is not applied
again; the first answer is replayed (docs/agent-api.md, "Retrying a write whose answer
was lost"; the header of draft-ietf-httpapi-idempotency-key-header).

    once = Once(scope="scanner", key="3f1c...", method="POST", path="/v1/...",
                body=body_digest(raw), answer=lambda result: (202, result.to_dict()))
    agent.increment(c, k, "stock", -2, once=once)   # writes, and records the answer
    agent.increment(c, k, "stock", -2, once=once)   # raises Replayed(the first answer)

The key's record is written by `guarded`, inside the SAME LMDB write transaction as the
write it answers: both are durable together or not at all (a crash between them cannot
leave a write without its key, or a key without its write). A write that fails (refused
input, full disk) aborts its transaction and records nothing, so it may be retried.

Databases (`agent.store`):

=======  =================================  ==========================================
idem     sha256(scope NUL key) (32 B)       {"m": method, "p": path, "b": body sha256
                                            hex, "s": status, "t": ms, "a": answer or
                                            "z": it zlib-compressed, base64 (> 1 KiB)};
                                            sealed on an encrypted store (the answer
                                            names records and change ids)
idem_t   t ms (8 B) + the idem key (32 B)   b"" -- oldest first, for pruning
idem_a   app tag (8 B) + t ms (8 B) + the   b"" -- each app's keys oldest first, for
         idem key (32 B)                    the fair bound
idem_c   app tag (8 B)                      how many keys the app holds (8 B)
=======  =================================  ==========================================

The app tag is the first 8 bytes of sha256("app" NUL app name); the idem record names
it ("g", hex) so that a record pruned by age also leaves its app's entries.

Keys are hashed: what an app sends is never a database key (its length and bytes are
the app's), and the file does not show it. Bounded: a record older than `keep_ms` is
treated as absent, and every write that records a key deletes up to `PRUNE_BATCH`
records: the oldest expired ones, then, while more than `max_keys` are held, the oldest
key of the app holding the most (`fair_victims`). One app sending keys without end so
pushes out its own keys, not another app's: an app holding fewer keys than the largest
keeps all of them (records of a store written before the fair bound, without an app
tag, go by age).
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from agent.core import Work
from agent.errors import BadRequest

T = TypeVar("T")

DB = "idem"
TIME_DB = "idem_t"
APP_DB = "idem_a"
COUNT_DB = "idem_c"
MAX_KEY_CHARS = 200
_PACK_OVER = 1024
"""Answers larger than this (as JSON) are stored compressed."""
PRUNE_BATCH = 8
"""Records deleted at most per recorded key: a write never pays for a large backlog
(after `max_keys` was lowered, the excess goes 7 per write)."""


class Replayed(Exception):  # not an AgentError: the answer to give, not a failure
    """This key's write was made before: `status` and `answer` are the first answer.
    Raised inside the write transaction, so that it aborts (nothing is written)."""

    def __init__(self, status: int, answer: Any) -> None:
        super().__init__(f"replayed {status}")
        self.status = status
        self.answer = answer


class KeyReused(BadRequest):
    """The key was recorded for another request (method, path or body differ)."""

    def __init__(self, message: str) -> None:
        super().__init__("idempotency_key_reused", message)


@dataclass(frozen=True)
class Once:
    """One idempotent write: who sent it (`scope`: the app), its key, what it was, how
    its answer is made from the write's result, and the bounds of the key records."""

    scope: str
    key: str
    method: str
    path: str
    body: str
    """sha256 of the body bytes, hex."""
    answer: Callable[[Any], tuple[int, Any]]
    keep_ms: int = 24 * 3600 * 1000
    max_keys: int = 10_000

    @property
    def db_key(self) -> bytes:
        return hashlib.sha256(self.scope.encode() + b"\0" + self.key.encode()).digest()

    @property
    def app_tag(self) -> bytes:
        return hashlib.sha256(b"app\0" + self.scope.encode()).digest()[:8]


# ------------------------------------------------------------------ pure parts


def check_key(raw: str) -> str | None:
    """None if `raw` is a valid key (1..200 printable ASCII characters), else why not."""
    if not raw:
        return "it is empty"
    if len(raw) > MAX_KEY_CHARS:
        return f"it has {len(raw)} characters, over {MAX_KEY_CHARS}"
    bad = next((c for c in raw if not " " <= c <= "~"), None)
    if bad is not None:
        return f"it holds {bad!r}: only printable ASCII (U+0020 to U+007E) is accepted"
    return None


def body_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def differs(stored: dict[str, Any], once: Once) -> list[str]:
    """What of `once` differs from the request recorded under its key, in the order
    method, path, body (empty: the same request)."""
    return [name for name, mine, theirs in (("method", once.method, stored["m"]),
                                            ("path", once.path, stored["p"]),
                                            ("body", once.body, stored["b"]))
            if mine != theirs]


def prune_plan(count: int, oldest: Iterable[tuple[int, T]], cutoff_ms: int, max_keys: int,
               batch: int = PRUNE_BATCH) -> list[T]:
    """Which records to delete: the longest prefix of `oldest` (records as (time, id),
    oldest first) whose each is expired (time < cutoff_ms) or over the bound (more than
    `max_keys` would stay), at most `batch` of them."""
    out: list[T] = []
    for t, ident in oldest:
        if len(out) >= batch:
            break
        if t < cutoff_ms or count - len(out) > max_keys:
            out.append(ident)
        else:
            break
    return out


def fair_victims(counts: dict[bytes, int], n: int) -> list[bytes]:
    """Whose oldest key to delete, `n` times: each time the app holding the most keys
    (ties: the smallest tag), counted down as it goes. So no app loses a key while
    another holds more than it (max-min fair); apps with none are never named."""
    held = {tag: c for tag, c in counts.items() if c > 0}
    out: list[bytes] = []
    while len(out) < n and held:
        tag = min(held, key=lambda t: (-held[t], t))
        out.append(tag)
        held[tag] -= 1
        if not held[tag]:
            del held[tag]
    return out


# ------------------------------------------------------------------ the store


def _live(work: Work, once: Once) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = work.tx.get(DB, once.db_key)
    if doc is None or doc["t"] < work.now() - once.keep_ms:
        return None  # expired and not pruned yet: as if absent
    return doc


def lookup(work: Work, once: Once) -> tuple[int, Any] | None:
    """The recorded answer (status, body) for `once`, or None; `KeyReused` if the key
    was recorded for another request. Reads only (a replay writes nothing)."""
    doc = _live(work, once)
    if doc is None:
        return None
    diff = differs(doc, once)
    if diff:
        raise KeyReused(
            f"the Idempotency-Key {once.key[:60]!r} was used for another request within "
            f"the last {once.keep_ms // 1000} s ({stored_request(doc)}): its "
            f"{' and '.join(diff)} differ{'s' if len(diff) == 1 else ''}; send a new key "
            "for a new write")
    return int(doc["s"]), _unpack(doc)


def _pack(answer: Any) -> dict[str, Any]:
    """The answer as stored: as it is, or zlib-compressed when large (a 100-operation
    transaction's answer is ~22 KB of repetitive JSON: kept ~10 times smaller, so the
    key records stay a few MB even at `max_keys`)."""
    raw = orjson.dumps(answer)
    if len(raw) <= _PACK_OVER:
        return {"a": answer}
    return {"z": base64.b64encode(zlib.compress(raw, 6)).decode()}


def _unpack(doc: dict[str, Any]) -> Any:
    if "z" in doc:
        return orjson.loads(zlib.decompress(base64.b64decode(doc["z"])))
    return doc["a"]


def stored_request(doc: dict[str, Any]) -> str:
    return f"{doc['m']} {str(doc['p'])[:200]}"


def guarded(fn: Callable[[Work], T], once: Once, work: Work) -> T:
    """`fn(work)`, unless `once`'s key was recorded (raises `Replayed`, or `KeyReused`);
    records the key with the answer made from fn's result in the same transaction."""
    found = lookup(work, once)
    if found is not None:
        raise Replayed(*found)
    result = fn(work)
    status, answer = once.answer(result)
    tx = work.tx
    dk = once.db_key
    old = tx.get(DB, dk)
    if old is not None:  # expired, not yet pruned: its index entries go with it
        _unindex(work, dk, old)
    now = work.now()
    tag = once.app_tag
    tx.put(DB, dk, {"m": once.method, "p": once.path, "b": once.body, "s": status,
                    "t": now, "g": tag.hex(), **_pack(answer)})
    t8 = now.to_bytes(8, "big")
    tx.put_raw(TIME_DB, t8 + dk)
    tx.put_raw(APP_DB, tag + t8 + dk)
    _add(work, tag, 1)
    prune(work, now - once.keep_ms, once.max_keys)
    return result


def _add(work: Work, tag: bytes, delta: int) -> None:
    raw = work.tx.raw(COUNT_DB, tag)
    held = (int.from_bytes(raw, "big") if raw else 0) + delta
    if held > 0:
        work.tx.put_raw(COUNT_DB, tag, held.to_bytes(8, "big"))
    else:
        work.tx.delete(COUNT_DB, tag)


def _unindex(work: Work, dk: bytes, doc: dict[str, Any]) -> None:
    """Delete the time and app entries of record `doc` (at `dk`)."""
    t8 = int(doc["t"]).to_bytes(8, "big")
    work.tx.delete(TIME_DB, t8 + dk)
    if "g" in doc:  # written with the fair bound
        tag = bytes.fromhex(doc["g"])
        if work.tx.delete(APP_DB, tag + t8 + dk):
            _add(work, tag, -1)


def _forget(work: Work, dk: bytes) -> None:
    doc = work.tx.get(DB, dk)
    if doc is not None:
        _unindex(work, dk, doc)
        work.tx.delete(DB, dk)


def _oldest(work: Work) -> Generator[tuple[int, bytes], None, None]:
    for tk in work.tx.keys(TIME_DB):
        yield int.from_bytes(tk[:8], "big"), tk


def prune(work: Work, cutoff_ms: int, max_keys: int) -> int:
    """Delete up to PRUNE_BATCH records: the oldest expired ones, then, while over
    `max_keys`, the oldest of the app holding the most; returns how many."""
    held = work.tx.count(DB)
    oldest = _oldest(work)
    try:  # expired ones first (a bound that large never counts)
        plan = prune_plan(held, oldest, cutoff_ms, held)
    finally:
        oldest.close()  # its cursor, before the deletes
    for tk in plan:
        _forget(work, tk[8:])
    over = min(work.tx.count(DB) - max_keys, PRUNE_BATCH - len(plan))
    if over <= 0:
        return len(plan)
    counts = {tag: int.from_bytes(raw, "big") for tag, raw in _counts(work)}
    untagged = work.tx.count(DB) - sum(counts.values())
    if untagged > 0:  # an older store's records (all older than any tagged): by age
        oldest = _oldest(work)
        try:
            aged = prune_plan(work.tx.count(DB), oldest, cutoff_ms, max_keys,
                              min(over, untagged))
        finally:
            oldest.close()
        for tk in aged:
            _forget(work, tk[8:])
        plan += aged
        over -= len(aged)
    for tag in fair_victims(counts, over):
        first = next(work.tx.keys(APP_DB, tag), None)
        if first is not None:
            _forget(work, first[16:])
            plan.append(first)
    return len(plan)


def _counts(work: Work) -> list[tuple[bytes, bytes]]:
    with work.tx.cursor(COUNT_DB) as cur:
        return list(cur) if cur.first() else []


def count(work: Work) -> int:
    """Key records held now (tests, status)."""
    return work.tx.count(DB)


__all__ = ["APP_DB", "COUNT_DB", "DB", "MAX_KEY_CHARS", "PRUNE_BATCH", "TIME_DB", "KeyReused",
           "Once", "Replayed", "body_digest", "check_key", "count", "differs", "fair_victims",
           "guarded", "lookup", "prune", "prune_plan"]
