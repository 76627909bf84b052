"""Reading records from the server store for the operator: one, a page, or all.

Thin I/O over `ReadTxn.records_after` (both backends); the decoding is
`broker.server.record_docs`. Memory stays bounded whatever the store holds: records are
read `PAGE` at a time in (collection, key) order, each page in its own short read
transaction, and handed on one by one. So an export is not one snapshot of the whole
store: each page is consistent, and a record written while the export runs appears in
it if its key is still ahead (use `waystation server backup` for a point-in-time copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from broker.errors import RecordNotFound, UnknownCollection
from broker.server.record_docs import decode_state, matches
from broker.server.store.base import Store
from schemas.collection import Catalog
from waystation.merge.state import RecordState

PAGE = 500
"""Records read per store transaction."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing: its records, and the key to continue after (None: the
    listing is complete)."""

    records: list[RecordState]
    next_after: str | None


def check_collection(store: Store, catalog: Catalog, collection: str) -> None:
    """UnknownCollection unless `collection` is in the schema or holds records (a
    collection dropped from the schema still shows what the store kept of it)."""
    if catalog.collection(collection) is not None:
        return
    with store.read() as txn:
        if txn.records_after(collection, None, 1):
            return
    known = ", ".join(sorted(catalog.collections)) or "none"
    raise UnknownCollection(f"no collection {collection!r} in the server's schema "
                            f"(version {catalog.version}: {known}) nor in its store")


def get_record(store: Store, catalog: Catalog, collection: str, key: str) -> RecordState:
    """The record `collection/key` (a deleted one too, not yet purged); RecordNotFound
    or UnknownCollection otherwise."""
    with store.read() as txn:
        state = txn.get_record(collection, key)
    if state is None:
        check_collection(store, catalog, collection)
        raise RecordNotFound(f"no record {collection}/{key} on the server (list the "
                             f"collection's keys with `waystation server list {collection}`)")
    return decode_state(state, collection, key)


def iter_records(store: Store, collection: str | None = None, *, scope: str | None = None,
                 after: str | None = None, deleted: bool = False,
                 page: int = PAGE) -> Iterator[RecordState]:
    """Every record of `collection` (None: of all collections) in key order, after key
    `after` (only with a collection), filtered by `scope` and `deleted` (see
    `record_docs.matches`), `page` records per read transaction."""
    if after is not None and collection is None:
        raise ValueError("after needs a collection")
    cursor: tuple[str, str] | None = None if after is None else (collection or "", after)
    while True:
        with store.read() as txn:
            rows = txn.records_after(collection, cursor, page)
        for c, k, state in rows:
            record = decode_state(state, c, k)
            if matches(record, scope=scope, deleted=deleted):
                yield record
            cursor = (c, k)
        if len(rows) < page:
            return


def list_page(store: Store, collection: str, *, scope: str | None = None,
              after: str | None = None, limit: int = 100, deleted: bool = False) -> Page:
    """Up to `limit` records of `collection` after key `after`, and where to go on."""
    out: list[RecordState] = []
    more = False
    for record in iter_records(store, collection, scope=scope, after=after, deleted=deleted,
                               page=min(PAGE, limit + 1)):
        if len(out) >= limit:
            more = True
            break
        out.append(record)
    return Page(out, out[-1].k if more and out else None)


__all__ = ["PAGE", "Page", "check_collection", "get_record", "iter_records", "list_page"]
