"""Queries asked of the server (PROTOCOL.md §7.14.1): the device's fetch-by-query queue.

`Agent.fetch_query` (any process) puts a request in the database ``fetchq`` (request
id -> collection, filter, limit, cursor, state); the sync daemon sends waiting requests
as `fetchq` -- only to a server that agreed to the `fetch_query` capability -- and
applies each `fetchedq` answer in one transaction: the records come back whole (their
eviction markers go, `agent.evicted`) and count as synced now, so a retention rule
evicts them again only after its period has passed since the fetch. The answer's last
message settles the request: `done` (with `next`/`stop` when the server stopped before
the collection's end) or `failed` (the server could not evaluate the filter). An
unanswered request is sent again after `RESEND_MS`, with the same id.

Bounded: at most `MAX_REQUESTS` requests are kept; settled ones go first (oldest
first) when room is needed, and asking while every kept request still waits is refused.
A request remembers at most `lim` (<= 1000) keys it brought back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from agent.core import Work
from agent.errors import BadRequest
from agent.store import record_key
from schemas import wire

DB = "fetchq"
MAX_REQUESTS = 64
RESEND_MS = 10_000
WAITING, DONE, FAILED = "waiting", "done", "failed"


@dataclass(frozen=True)
class QueryRequest:
    """One request and how far its answer got (see the module docstring)."""

    id: str
    collection: str
    where: dict[str, Any]
    limit: int
    after: str | None
    state: str
    keys: list[str] = field(default_factory=list)
    """Keys of the records the answer brought back, in key order."""
    next: str | None = None
    stop: str | None = None
    scanned: int = 0
    error: dict[str, str] | None = None
    created_ms: int = 0

    @classmethod
    def from_doc(cls, rid: str, doc: dict[str, Any]) -> QueryRequest:
        return cls(rid, doc["c"], dict(doc["w"]), int(doc["lim"]), doc.get("after"),
                   doc["state"], list(doc.get("keys", ())), doc.get("next"),
                   doc.get("stop"), int(doc.get("scanned", 0)), doc.get("err"),
                   int(doc.get("t", 0)))


def new_id(now_ms: int) -> str:
    """Request ids sort by creation time (the queue is sent oldest first)."""
    return f"q-{now_ms:013d}-{uuid.uuid4().hex[:8]}"


def enqueue(work: Work, collection: str, where: dict[str, Any], limit: int,
            after: str | None) -> str:
    """Queue one request (the filter already checked); returns its id."""
    tx = work.tx
    held = list(tx.items(DB))
    if len(held) >= MAX_REQUESTS:
        settled = [raw for raw, doc in held if doc["state"] != WAITING]
        if not settled:
            raise BadRequest("too_many", f"{MAX_REQUESTS} queries wait for the server "
                                         "already: wait for their answers, then ask again")
        for raw in settled[: len(held) - MAX_REQUESTS + 1]:
            tx.delete(DB, raw)
    now = work.now()
    rid = new_id(now)
    tx.put(DB, rid.encode(), {"c": collection, "w": where, "lim": limit, "after": after,
                              "state": WAITING, "t": now})
    return rid


def get(work: Work, rid: str) -> QueryRequest | None:
    doc = work.tx.get(DB, rid.encode())
    return None if doc is None else QueryRequest.from_doc(rid, doc)


def next_request(work: Work, *, resend_ms: int = RESEND_MS) -> wire.FetchQuery | None:
    """The oldest waiting request not sent within `resend_ms`, marked as sent; None
    when nothing waits."""
    tx = work.tx
    now = work.now()
    for raw, doc in tx.items(DB):
        if doc["state"] != WAITING:
            continue
        sent = doc.get("sent")
        if isinstance(sent, int) and now - sent < resend_ms:
            continue
        tx.put(DB, raw, {**doc, "sent": now})
        msg: dict[str, Any] = {"dev": work.dev, "req": raw.decode(), "c": doc["c"],
                               "w": doc["w"], "lim": doc["lim"]}
        if doc.get("after") is not None:
            msg["after"] = doc["after"]
        return wire.FetchQuery.model_validate(msg)
    return None


def waiting(work: Work) -> int:
    return sum(1 for _, doc in work.tx.items(DB) if doc["state"] == WAITING)


def apply_answer(work: Work, msg: wire.FetchedQuery) -> QueryRequest | None:
    """Apply one `fetchedq`: its records come back whole; the last message settles the
    request. An answer to a request this device does not wait for (settled already, or
    never asked) changes nothing."""
    tx = work.tx
    raw = msg.req.encode()
    doc = tx.get(DB, raw)
    if doc is None or doc["state"] != WAITING or doc["c"] != msg.c:
        return None
    recs = [rec for rec in msg.recs if rec.c == msg.c]
    work.observe([h for rec in recs for h in rec.h.values()])
    work.apply_recs(recs, "fetched", fetched=True)
    for rec in recs:
        tx.delete("fetch", record_key(rec.c, rec.k))  # no longer asked for by key either
    keys = list(dict.fromkeys([*doc.get("keys", ()), *(rec.k for rec in recs)]))
    new = {**doc, "keys": keys[: int(doc["lim"])]}
    if msg.end:
        new.update(state=FAILED if msg.err is not None else DONE, next=msg.next,
                   stop=msg.stop, scanned=msg.scanned, done_t=work.now(),
                   err=None if msg.err is None else {"code": msg.err.code,
                                                     "reason": msg.err.reason})
    tx.put(DB, raw, new)
    return QueryRequest.from_doc(msg.req, new)


__all__ = ["DB", "DONE", "FAILED", "MAX_REQUESTS", "RESEND_MS", "WAITING", "QueryRequest",
           "apply_answer", "enqueue", "get", "new_id", "next_request", "waiting"]
