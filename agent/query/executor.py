"""Running a plan over LMDB cursors (a thin adapter around `agent.query.planner`).

One cursor per range of the plan; the ranges are merged by the merge key of their
entries (`heapq.merge`), so a query with `in` lists comes back in one order. Only the
entries of the page (plus one, to know whether a next page exists) are read, and only
their views are loaded. A count reads index entries only, never views.
"""

from __future__ import annotations

import heapq
from collections.abc import Generator

from agent.query.logs import event
from agent.query.planner import Plan, Range
from agent.store import Tx, record_key
from agent.view import ViewState

_AFTER = b"\x00"
"""Appended to a position to seek just past it (every longer key with that prefix sorts
after the position plus 0x00)."""


def _scan(tx: Tx, plan: Plan, rng: Range,
          after: bytes | None) -> Generator[tuple[bytes, bytes], None, None]:
    """(merge key, entry value) of the accepted entries of one range, in plan order,
    strictly after position `after`."""
    with tx.cursor("index") as cur:
        if not plan.desc:
            start = rng.lo
            if after is not None:
                resume = rng.lo[:rng.strip] + after + _AFTER
                if resume > start:
                    start = resume
            if not cur.set_range(start):
                return
            for key, value in cur.iternext():
                if key >= rng.hi:
                    return
                if plan.accepts(rng, key, value):
                    yield key[rng.strip:], value
        else:
            end = rng.hi
            if after is not None:
                resume = rng.lo[:rng.strip] + after
                if resume < end:
                    end = resume
            found = cur.prev() if cur.set_range(end) else cur.last()
            if not found:
                return
            for key, value in cur.iterprev():
                if key < rng.lo:
                    return
                if plan.accepts(rng, key, value):
                    yield key[rng.strip:], value


def index_page(tx: Tx, plan: Plan, limit: int,
               after: bytes | None) -> tuple[list[ViewState], bytes | None]:
    """The views of the next `limit` matching records, and the position of the last
    one when more follow (None on the last page)."""
    scans = [_scan(tx, plan, rng, after) for rng in plan.ranges]
    out: list[ViewState] = []
    last: bytes | None = None
    more = False
    try:
        merged = heapq.merge(*scans, key=lambda item: item[0], reverse=plan.desc)
        for position, value in merged:
            if len(out) >= limit:
                more = True
                break
            k = value[1:].decode()
            doc = tx.get("view", record_key(plan.collection, k))
            if doc is None:
                # Cannot happen while entries change with their views; say so if it does.
                event("warning", "index_entry_without_view", collection=plan.collection,
                      key=k, index=plan.index_name)
                continue
            out.append(ViewState.from_doc(plan.collection, k, doc))
            last = position
    finally:
        for scan in scans:
            scan.close()
    return out, (last if more else None)


def key_page(tx: Tx, plan: Plan, limit: int,
             after: bytes | None) -> tuple[list[ViewState], bytes | None]:
    """Without an index: records in key order from the views themselves."""
    prefix = plan.collection.encode() + b"\0"
    start = prefix + after + _AFTER if after is not None else prefix
    out: list[ViewState] = []
    for raw, doc in tx.items("view", prefix, start=start):
        k = raw[len(prefix):].decode()
        if doc["x"] and not plan.include_deleted:
            continue
        if len(out) >= limit:
            return out, out[-1].k.encode()
        out.append(ViewState.from_doc(plan.collection, k, doc))
    return out, None


def page(tx: Tx, plan: Plan, limit: int,
         after: bytes | None) -> tuple[list[ViewState], bytes | None]:
    if plan.index is None:
        return key_page(tx, plan, limit, after)
    return index_page(tx, plan, limit, after)


def count(tx: Tx, plan: Plan) -> int:
    """How many records match (index entries only when an index serves the plan)."""
    if plan.index is None:
        prefix = plan.collection.encode() + b"\0"
        return sum(1 for _, doc in tx.items("view", prefix)
                   if plan.include_deleted or not doc["x"])
    total = 0
    with tx.cursor("index") as cur:
        for rng in plan.ranges:
            if not cur.set_range(rng.lo):
                break
            for key, value in cur.iternext():
                if key >= rng.hi:
                    break
                if plan.accepts(rng, key, value):
                    total += 1
    return total


__all__ = ["count", "index_page", "key_page", "page"]
