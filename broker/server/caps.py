"""The optional protocol features this server serves (PROTOCOL.md §11).

A device lists the features it speaks in `hello.caps`; the server answers with `welcome`
naming the ones both sides speak, and keeps them in the device's row so that it sends a
device nothing it did not agree to. A feature joins `SERVER_CAPS` in the commit that
implements it on the server.
"""

from __future__ import annotations

from collections.abc import Iterable

from schemas import zdict

SCHEMA = "schema"
"""The server states its schema versions in `welcome` (`sv`, `sv_min`) and holds back
changes written under a version older than `sv_min` (PROTOCOL.md §11)."""

ZDICT = zdict.CAP
"""Small down messages compressed with the protocol's preset dictionary, and up
messages read that way (§3, `schemas.zdict`)."""

SCHEMA_PUSH = "schema_push"
"""The server sends a device that runs another schema version than the server's the
published version it should run next, in a `schema` message (PROTOCOL.md §7.13), at its
`hello` and when the operator publishes or rolls back while it is online."""

FETCH = "fetch"
"""The server answers `fetch` (records by key) with `fetched` (PROTOCOL.md §7.14)."""

FETCH_QUERY = "fetch_query"
"""The server answers `fetchq` (records matching a filter) with `fetchedq` (PROTOCOL.md
§7.14.1)."""

SERVER_CAPS: frozenset[str] = frozenset(
    {"creds", "scopes", "sync", "txn", SCHEMA, SCHEMA_PUSH, FETCH, FETCH_QUERY, ZDICT})
"""creds: `waystation device rotate-password` reaches the device as a `creds` command
(§7.9) and `hello.cred` tells the server it logged in with the new password (§7.1).
scopes: `waystation device scopes` reaches the device as a `scopes` command (§7.9).
sync: `waystation device sync` reaches the device as a `sync` command (§7.9).
txn: transactions applied all or none (§7.2.1, §10.5).
schema: see `SCHEMA`.
schema_push: see `SCHEMA_PUSH`.
fetch: see `FETCH`.
fetch_query: see `FETCH_QUERY`.
zd1: see `ZDICT`."""


def agreed(offered: Iterable[str]) -> tuple[str, ...]:
    """The features both the device (`offered`) and this server speak, sorted."""
    return tuple(sorted(set(offered) & SERVER_CAPS))


__all__ = ["FETCH", "FETCH_QUERY", "SCHEMA", "SCHEMA_PUSH", "SERVER_CAPS", "ZDICT", "agreed"]
