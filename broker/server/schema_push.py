"""The schema the server runs, reloaded when the operator publishes or rolls back, and
the `schema` messages that bring devices to it (issue 10 §1, PROTOCOL.md §7.13).

`LiveSchema` reads the store's schema history (`broker.server.schema_history`) and
decides which version the server runs: the newest live (not rolled back) published
version, or the server's schema file when that is newer than anything ever published
(as before histories existed: its changes are judged as written, with a warning). The
engine calls `refresh` whenever the registry generation moves; `schema publish` and
`schema rollback` bump it in their transaction, so a running server follows within a
tick on both stores, without a restart.

To a device that agreed `schema_push`, the server sends the version it should run next
(`push_for`): the first live version above the device's when the device is behind, the
live version itself when the device runs a newer one (a rolled-back version). Devices
move one published version per `schema` message and announce each step in a `hello`,
so a device offline across several versions walks the history in order, each step one
local transaction.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
import structlog

from broker.server import schema_history
from broker.server.caps import SCHEMA, SCHEMA_PUSH
from broker.server.downcast import Downcaster
from broker.server.messages import welcome_message
from broker.server.store.base import DeviceRow, ReadTxn
from broker.server.upcast import SchemaChain
from schemas.collection import Catalog
from schemas.errors import CollectionSchemaError
from schemas.wire import MAX_SCHEMA_PUSH_TEXT

log = structlog.get_logger(__name__)


Signature = tuple[tuple[int, int], ...]


class LiveSchema:
    """The catalog, upcast chain and down-projection the server runs (see module)."""

    def __init__(self, file_catalog: Catalog) -> None:
        self.file = file_catalog
        self.catalog = file_catalog
        self.chain = SchemaChain([])
        self.downcaster: Downcaster | None = None
        self.signature: Signature | None = None
        self._texts: dict[int, str] = {}
        self._live: list[int] = []
        self.withdrawn: frozenset[int] = frozenset()
        """Versions rolled back: a device still on one is told to go back down."""

    def refresh(self, txn: ReadTxn) -> bool:
        """Reload when the history changed since the last call; True when the version
        the server runs, or the history behind it, changed."""
        rows = schema_history.rows(txn)
        signature = tuple((r.version, r.rolled_back_ms) for r in rows)
        if signature == self.signature:
            return False
        try:
            versions = schema_history.live_versions(txn)
        except CollectionSchemaError:
            # A stored version no longer parses (edited by hand?): keep what runs now.
            log.exception("schema_history_unreadable")
            return False
        first = self.signature is None
        before = self.catalog.version
        self.signature = signature
        highest = max((r.version for r in rows), default=0)
        if not versions or self.file.version > highest:
            self.catalog = self.file
            chain_versions = [v for v in versions if v.row.version <= self.file.version]
            if chain_versions and chain_versions[-1].row.version != self.file.version:
                log.warning("schema_not_in_history", version=self.file.version,
                            newest_published=chain_versions[-1].row.version,
                            hint="publish the schema file with `waystation schema publish "
                                 "FILE` so that older devices' changes are upcast")
                chain_versions = []
        else:
            self.catalog = versions[-1].catalog
            chain_versions = versions
        self.chain = SchemaChain(chain_versions)
        self.downcaster = (Downcaster(self.chain, self.catalog.version)
                           if chain_versions else None)
        self._texts = {v.row.version: v.row.text for v in versions}
        self._live = [v.row.version for v in versions]
        self.withdrawn = frozenset(r.version for r in rows if r.rolled_back_ms)
        if not first:
            log.info("schema_reloaded", version=self.catalog.version, previous=before,
                     oldest=self.chain.oldest)
        return True

    def target_for(self, sv: int) -> int | None:
        """The version a device running `sv` should move to next, or None: it runs the
        server's version, or the server has none to give (nothing published)."""
        current = self.catalog.version
        if sv == current or current not in self._texts:
            return None
        if sv > current:
            return current  # a version rolled back (or never published): go back
        return next((v for v in self._live if v > sv), None)

    def push_for(self, sv: int) -> bytes | None:
        """The `schema` message for a device running `sv`, or None (see `target_for`).
        A version whose text is over the message's bound is not sent (logged): the
        device keeps running what it has and is told "upgrade needed" when too old."""
        target = self.target_for(sv)
        if target is None:
            return None
        text = self._texts[target]
        if len(text) > MAX_SCHEMA_PUSH_TEXT:
            log.warning("schema_too_large_to_push", version=target, chars=len(text),
                        limit=MAX_SCHEMA_PUSH_TEXT,
                        hint="shorten the schema file (descriptions, comments) and publish "
                             "it as a new version; install it on devices by hand meanwhile")
            return None
        return orjson.dumps({"type": "schema", "v": 1, "sv": target, "text": text})

    def welcome(self, caps: tuple[str, ...], server: str, sv: int) -> list[bytes]:
        """The answer to a `hello` with `caps` from a device running `sv`, before its
        commands: the `welcome` (§7.11; with `schema`: `sv` and `sv_min`), then with
        `schema_push` the `schema` message the device needs, if any."""
        if SCHEMA not in caps:
            return [welcome_message(caps, server)]
        out = [welcome_message(caps, server, self.catalog.version, self.chain.oldest)]
        push = self.push_for(sv) if SCHEMA_PUSH in caps else None
        return out if push is None else [*out, push]

    def pushes(self, rows: Iterable[DeviceRow], online: frozenset[str]) -> list[tuple[str, bytes]]:
        """A `schema` message for every online device that agreed `schema_push` and does
        not run the server's version (after a publish or a rollback)."""
        out = []
        for row in rows:
            if row.id in online and SCHEMA_PUSH in row.caps and row.sv:
                msg = self.push_for(row.sv)
                if msg is not None:
                    out.append((row.id, msg))
        return out


__all__ = ["LiveSchema"]
