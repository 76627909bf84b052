"""Fetch by query (PROTOCOL.md §7.14.1, capability `fetch_query`): the live records of
one collection in the device's scopes that match a filter, in key order.

The filter means what it means in the device's local queries (`waystation.filters`).
The server holds no per-field indexes, so an answer is a scan of the collection's
records in key order from the request's `after`, reading at most `scan_budget` records
(whatever their scope or match) and returning at most `min(lim, max_records)`. When it
stops before the collection's end it says why (`stop`: limit or budget) and where to go
on (`next`: the last key it read, or the last it returned). The answer is cut into
`fetchedq` messages of at most `MAX_DOWN_BYTES` each; the last says `end`.

Records outside the device's scopes are read (they count against the budget) and never
sent; a filter on `$scope` naming a scope the device does not follow matches nothing.
A filter the server's schema cannot evaluate (unknown collection or field, a value of
the wrong type) is answered with `err` and no records.

A device cannot make the server scan without end by asking again and again: each
device has an allowance of records to read (`ScanAllowance`, a token bucket refilled at
`rate` records a second up to `burst`); a request reads at most what is left of it, and
at least `MIN_SCAN` records so that every answer makes progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from broker.server.messages import MAX_DOWN_BYTES, dumps
from broker.server.store.base import DeviceRow, ReadTxn
from schemas.collection import Catalog
from schemas.wire import FetchQuery
from waystation import merge
from waystation.filters import FilterError, compile_filter

SCAN_PAGE = 256
"""Records read per store call while scanning (bounded by the remaining budget)."""


@dataclass(frozen=True, slots=True)
class QueryLimits:
    max_records: int = 1000
    """Records one answer holds at most (a request's `lim` is capped to it)."""
    scan_budget: int = 5_000
    """Records one request may make the server read (the cost a device can cause)."""


DEFAULT_LIMITS = QueryLimits()
MIN_SCAN = 100
"""Records any request may read, whatever its device's allowance (progress guaranteed)."""


class ScanAllowance:
    """Records each device's fetch-by-query requests may make the server read: a token
    bucket per device, `rate` records a second up to `burst` (one entry per registered
    device that asked: bounded by the registry)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], int]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._left: dict[str, tuple[float, int]] = {}

    def _now_left(self, dev: str) -> float:
        now = self.clock()
        left, at = self._left.get(dev, (float(self.burst), now))
        return min(float(self.burst), left + max(0, now - at) * self.rate / 1000)

    def limits(self, dev: str, base: QueryLimits) -> QueryLimits:
        """`base` with its scan budget cut to what `dev` has left (at least MIN_SCAN)."""
        budget = max(MIN_SCAN, min(base.scan_budget, int(self._now_left(dev))))
        return base if budget == base.scan_budget else replace(base, scan_budget=budget)

    def spend(self, dev: str, scanned: int) -> None:
        self._left[dev] = (max(0.0, self._now_left(dev) - scanned), self.clock())


def _message(req: FetchQuery, recs: list[bytes], *, end: bool, next_key: str | None = None,
             stop: str | None = None, scanned: int = 0,
             err: tuple[str, str] | None = None) -> bytes:
    head: dict[str, object] = {"type": "fetchedq", "v": 1, "req": req.req, "c": req.c,
                               "end": end}
    if end:
        head["scanned"] = scanned
        if next_key is not None:
            head["next"] = next_key
        if stop is not None:
            head["stop"] = stop
        if err is not None:
            head["err"] = {"code": err[0], "reason": err[1]}
    raw = dumps(head)
    return raw[:-1] + b',"recs":[' + b",".join(recs) + b"]}"


@dataclass(slots=True)
class QueryAnswer:
    messages: list[bytes]
    records: int
    scanned: int


def answer(txn: ReadTxn, device: DeviceRow, req: FetchQuery, catalog: Catalog | None,
           limits: QueryLimits = DEFAULT_LIMITS, budget: int = MAX_DOWN_BYTES) -> QueryAnswer:
    """The `fetchedq` messages answering `req` from `device`."""
    spec = None if catalog is None else catalog.collection(req.c)
    if spec is None:
        return QueryAnswer([_message(req, [], end=True, err=(
            "unknown_collection", f"the server's schema has no collection {req.c!r}"))], 0, 0)
    try:
        flt = compile_filter(spec, req.w)
    except FilterError as exc:
        return QueryAnswer([_message(req, [], end=True, err=(exc.code, str(exc)))], 0, 0)
    want = min(req.lim, limits.max_records)
    scopes = set(device.scopes)
    found: list[tuple[str, bytes]] = []
    scanned = 0
    cursor = None if req.after is None else (req.c, req.after)
    last_read: str | None = None
    stop: str | None = None
    exhausted = False
    while len(found) < want:
        room = limits.scan_budget - scanned
        if room <= 0:
            stop = "budget"
            break
        asked = min(SCAN_PAGE, room)
        rows = txn.records_after(req.c, cursor, asked)
        full = False
        for i, (_, key, raw) in enumerate(rows):
            scanned += 1
            last_read = key
            scope = raw.get("s")
            if scope not in scopes:
                continue
            # Most records were never deleted: their values are read without building
            # the record, which is parsed only when it matches (see `merge.live_values`).
            values = merge.live_values(raw)
            record = None
            if values is None:
                record = merge.from_json(raw)
                if record.deleted:
                    continue
                values = record.values()
            if flt.matches(scope, values):
                found.append((key, dumps(merge.to_rec(record or merge.from_json(raw)))))
                if len(found) >= want:
                    full = i + 1 < len(rows) or len(rows) == asked
                    break
        if len(rows) < asked and not full:
            exhausted = True  # the store had no more records of the collection
            break
        cursor = (req.c, last_read) if last_read is not None else cursor
    next_key: str | None = None
    if not exhausted:
        if stop is None:
            stop = "limit"
        next_key = last_read if last_read is not None else req.after
        if stop == "limit" and found:
            next_key = found[-1][0]
    if next_key is not None and stop == "limit" and not _more_after(txn, req.c, next_key):
        next_key, stop = None, None  # the last record read was the collection's last
    messages: list[bytes] = []
    page: list[bytes] = []
    used = 512
    for _, rec in found:
        if page and used + len(rec) + 1 > budget:
            messages.append(_message(req, page, end=False))
            page, used = [], 512
        page.append(rec)
        used += len(rec) + 1
    messages.append(_message(req, page, end=True, next_key=next_key, stop=stop,
                             scanned=scanned))
    return QueryAnswer(messages, len(found), scanned)


def _more_after(txn: ReadTxn, c: str, key: str) -> bool:
    return bool(txn.records_after(c, (c, key), 1))


__all__ = ["DEFAULT_LIMITS", "MIN_SCAN", "SCAN_PAGE", "QueryAnswer", "QueryLimits",
           "ScanAllowance", "answer"]
