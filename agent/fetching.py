"""Records asked back from the server (PROTOCOL.md §7.14): the device's fetch queue.

`Agent.fetch` (any process) puts record keys in the database ``fetch``; the sync daemon
sends them as `fetch` requests -- at most `MAX_FETCH_KEYS` keys of one collection each,
only to a server that agreed to the `fetch` capability -- and applies each `fetched`
answer in one transaction: the records come back whole (their eviction markers go,
`agent.evicted`), a key the server does not hold for this device leaves the queue with
a feed event saying so. An unanswered request is sent again after `RESEND_MS`.

Bounded: the queue holds at most `MAX_QUEUE` keys; asking for more is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.core import Work
from agent.errors import BadRequest
from agent.store import record_key, split_record_key
from schemas import wire

DB = "fetch"
MAX_QUEUE = 10_000
RESEND_MS = 10_000


@dataclass(frozen=True)
class FetchedResult:
    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def enqueue(work: Work, rks: Iterable[bytes]) -> int:
    """Queue these records for fetching; returns how many were new in the queue."""
    tx = work.tx
    new = [rk for rk in dict.fromkeys(rks) if not tx.has(DB, rk)]
    if new and tx.count(DB) + len(new) > MAX_QUEUE:
        raise BadRequest("too_many", f"the fetch queue holds at most {MAX_QUEUE} records and "
                                     f"{tx.count(DB)} wait: fetch fewer at a time")
    now = work.now()
    for rk in new:
        tx.put(DB, rk, {"t": now})
    return len(new)


def next_request(work: Work, req: str, *, resend_ms: int = RESEND_MS) -> wire.Fetch | None:
    """The next `fetch` to send (keys of one collection not sent within `resend_ms`),
    marked as sent under `req`; None when nothing waits."""
    tx = work.tx
    now = work.now()
    collection: str | None = None
    keys: list[str] = []
    picked: list[tuple[bytes, dict[str, object]]] = []
    for rk, doc in tx.items(DB):
        sent = doc.get("sent")
        if isinstance(sent, int) and now - sent < resend_ms:
            continue
        c, k = split_record_key(rk)
        if collection is None:
            collection = c
        elif c != collection:
            break  # keys are in collection order: this request is full
        keys.append(k)
        picked.append((rk, doc))
        if len(keys) >= wire.MAX_FETCH_KEYS:
            break
    if collection is None:
        return None
    for rk, doc in picked:
        tx.put(DB, rk, {**doc, "sent": now, "req": req})
    return wire.Fetch(dev=work.dev, req=req, c=collection, k=keys)


def apply_fetched(work: Work, msg: wire.Fetched) -> FetchedResult:
    """Apply one `fetched` answer: the records come back whole; the missing keys leave
    the queue (and their eviction markers: the server holds nothing to bring back)."""
    tx = work.tx
    recs = [rec for rec in msg.recs if rec.c == msg.c]
    work.observe([h for rec in recs for h in rec.h.values()])
    work.apply_recs(recs, "fetched", fetched=True)
    found: list[str] = []
    for rec in recs:
        tx.delete(DB, record_key(rec.c, rec.k))
        found.append(rec.k)
    missing: list[str] = []
    for k in msg.miss:
        rk = record_key(msg.c, k)
        if tx.delete(DB, rk) or tx.has("evicted", rk):
            tx.delete("evicted", rk)
            work.feed(msg.c, k, "fetched", {"missing": True})
            missing.append(k)
    return FetchedResult(found, missing)


__all__ = ["DB", "MAX_QUEUE", "RESEND_MS", "FetchedResult", "apply_fetched", "enqueue",
           "next_request"]
