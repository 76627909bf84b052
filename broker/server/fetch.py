"""Fetch by key (PROTOCOL.md §7.14, capability `fetch`): whole record states of the keys
a device asks for, answered from one read snapshot.

Bounded: a request names at most `wire.MAX_FETCH_KEYS` keys of one collection (the wire
model refuses more); the answer is cut into `fetched` messages of at most
`MAX_DOWN_BYTES` each. A key the server does not hold for this device -- never written,
purged, or in a scope the device does not follow -- is listed in `miss`, the three
never told apart (a device learns nothing of records outside its scopes).
"""

from __future__ import annotations

from broker.server.messages import MAX_DOWN_BYTES, dumps
from broker.server.store.base import DeviceRow, ReadTxn
from schemas.wire import Fetch
from waystation import merge


def fetched_message(req: str, c: str, recs: list[bytes], miss: list[str]) -> bytes:
    head = dumps({"type": "fetched", "v": 1, "req": req, "c": c, "miss": miss})
    return head[:-1] + b',"recs":[' + b",".join(recs) + b"]}"


def answer(txn: ReadTxn, device: DeviceRow, req: Fetch,
           budget: int = MAX_DOWN_BYTES) -> tuple[list[bytes], int]:
    """The `fetched` messages answering `req` from `device`, and the records in them."""
    found: list[bytes] = []
    miss: list[str] = []
    for key in dict.fromkeys(req.k):  # a key asked twice is answered once
        raw = txn.get_record(req.c, key)
        if raw is None:
            miss.append(key)
            continue
        record = merge.from_json(raw)
        if record.s not in device.scopes:
            miss.append(key)
            continue
        found.append(dumps(merge.to_rec(record)))
    messages: list[bytes] = []
    page: list[bytes] = []
    used = 512 + sum(len(k) + 3 for k in miss)
    for rec in found:
        if page and used + len(rec) + 1 > budget:
            messages.append(fetched_message(req.req, req.c, page, []))
            page, used = [], 512
        page.append(rec)
        used += len(rec) + 1
    messages.append(fetched_message(req.req, req.c, page, miss))
    return messages, len(found)


__all__ = ["answer", "fetched_message"]
