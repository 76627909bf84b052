"""Catch-up (PROTOCOL.md §7.3, §7.7, §7.8, §9.5): pages of whole record states in q order.

The index holds each record once, at its newest version, so the records with
`from < q <= to` in q order are exactly what a device with checkpoint `from` misses.
A page ends after `lim` records or `MAX_DOWN_BYTES`; its `to` is then its last record's
q (`more`), else the scope's current sequence. A checkpoint `cp` the server cannot
continue from — older than the purge horizon (a tombstone the device may not have seen
is gone), or beyond the scope's sequence (the store was replaced) — starts a snapshot:
`reset` and `from` 0, unless the device says it is already in one (`snap`); so does a
catch-up from 0 whose first page ends below the purge horizon (its continuation would
be reset). A scope whose
sequence is past the checkpoint gets a page even with no records in the range, to move
the checkpoint there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from broker.errors import StoreError
from broker.server import fetch, fetch_query
from broker.server.fetch_query import QueryLimits, ScanAllowance
from broker.server.messages import (
    MAX_DOWN_BYTES,
    Compression,
    checkpoint_message,
    compress,
    error_message,
    page_message,
    whole_rec,
)
from broker.server.registry import RegistryMoved
from broker.server.store.base import DeviceRow, ReadTxn, Store
from schemas import codec
from schemas.collection import Catalog
from schemas.wire import Catchup, Fetch, FetchQuery

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class CatchupAnswer:
    """The messages answering one catch-up request."""

    messages: list[bytes] = field(default_factory=list)
    cp: dict[str, int] = field(default_factory=dict)
    """Where the device's checkpoints stand after these messages."""
    complete: bool = True
    """No page says `more`: the answer ends with a `checkpoint` message."""
    records: int = 0


def answer(txn: ReadTxn, device: DeviceRow, req: Catchup,
           budget: int = MAX_DOWN_BYTES) -> CatchupAnswer:
    """The pages (and, when complete, the checkpoint) for `req` from `device`."""
    out = CatchupAnswer()
    denied: list[str] = []
    snap = set(req.snap)
    for scope, cp in req.cp.items():
        if scope not in device.scopes:
            denied.append(scope)
            continue
        seq = txn.scope_seq(scope)
        start, reset = cp, False
        if scope not in snap and cp > 0 and (cp < txn.purge_horizon(scope) or cp > seq):
            start, reset = 0, True
        entries = txn.index_range(scope, start, req.lim + 1)
        more = len(entries) > req.lim
        recs: list[bytes] = []
        used = 256
        last_q = start
        for q, c, k in entries[: req.lim]:
            raw = txn.get_record(c, k)
            if raw is None:  # pragma: no cover - index and records change together
                continue
            rec = whole_rec(raw)
            if recs and used + len(rec) + 1 > budget:
                more = True
                break
            recs.append(rec)
            used += len(rec) + 1
            last_q = q
        to = last_q if more else seq
        if more and cp == 0 and not reset and scope not in snap \
                and to < txn.purge_horizon(scope):
            # A device from nothing gets a snapshot too when its continuation (from
            # `to`) would be below the purge horizon (purged tombstones, a restore's
            # jump): that one would be reset to 0 and this page sent again (§9.5). Said
            # now, the device lists the scope in `snap` and goes on from `to`.
            reset = True
        out.cp[scope] = to
        out.records += len(recs)
        # A page also when it carries no record but moves the checkpoint: the scope's
        # sequence can be past every record left (purged tombstones, a restore's jump),
        # and the device only moves its checkpoint over pages (§7.8), never to the
        # `checkpoint` message's value: without this page it would ask again for ever.
        if recs or reset or to > start:
            out.messages.append(page_message(req.req, scope, start, to, reset, more, recs))
        if more:
            out.complete = False
    if out.complete:
        out.messages.append(checkpoint_message(req.req, out.cp, denied))
    return out


def answer_all(store: Store,
               requests: Sequence[tuple[DeviceRow, Catchup | Fetch | FetchQuery]],
               compress_over: Callable[[str], Compression], catalog: Catalog | None = None,
               limits: QueryLimits = fetch_query.DEFAULT_LIMITS,
               allowance: ScanAllowance | None = None, *,
               generation: int | None = None) -> tuple[list[tuple[str, bytes]], int]:
    """Answer several devices' requests from one snapshot: (messages, records sent).
    A `fetch` (§7.14) and a `fetchq` (§7.14.1, evaluated on `catalog`, each device's
    scan cut to its `allowance`) are answered here too: they read the same way
    (`broker.server.fetch`, `broker.server.fetch_query`).

    With `generation` (the registry generation the caller's schema was loaded at), a
    snapshot taken after a `schema publish` / `rollback` the caller has not loaded
    raises `RegistryMoved` before anything is read: its records are in names the
    caller's down-projection does not know.

    A request that fails gets a transient `server_error`; the others are answered.
    """
    out: list[tuple[str, bytes]] = []
    records = 0
    try:
        with store.read() as txn:
            if generation is not None and txn.registry_generation() != generation:
                raise RegistryMoved("the registry moved since it was loaded")
            for device, req in requests:
                try:
                    if isinstance(req, Fetch):
                        msgs, count = fetch.answer(txn, device, req)
                        records += count
                        over = compress_over(device.id)
                        out.extend((device.id, compress(m, over)) for m in msgs)
                        continue
                    if isinstance(req, FetchQuery):
                        own = limits if allowance is None else allowance.limits(device.id,
                                                                                limits)
                        qa = fetch_query.answer(txn, device, req, catalog, own)
                        if allowance is not None:
                            allowance.spend(device.id, qa.scanned)
                        records += qa.records
                        log.info("fetch_query", dev=device.id, req=req.req, c=req.c,
                                 records=qa.records, scanned=qa.scanned)
                        over = compress_over(device.id)
                        out.extend((device.id, compress(m, over)) for m in qa.messages)
                        continue
                    ans = answer(txn, device, req)
                except Exception:
                    log.exception("catchup_failed", dev=device.id)
                    out.append((device.id, error_message(
                        codec.SERVER_ERROR, "the server failed to answer this catch-up; "
                                            "ask again later")))
                    continue
                records += ans.records
                over = compress_over(device.id)
                out.extend((device.id, compress(m, over)) for m in ans.messages)
    except StoreError:
        log.exception("catchup_store_failed")
        out.extend((device.id, error_message(codec.SERVER_ERROR, "the server's store failed; "
                                             "ask again later")) for device, _ in requests)
    return out, records


__all__ = ["CatchupAnswer", "answer", "answer_all"]
