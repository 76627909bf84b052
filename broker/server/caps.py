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

SERVER_CAPS: frozenset[str] = frozenset({"scopes", "sync", "txn", SCHEMA, ZDICT})
"""scopes: `waystation device scopes` reaches the device as a `scopes` command (§7.9).
sync: `waystation device sync` reaches the device as a `sync` command (§7.9).
txn: transactions applied all or none (§7.2.1, §10.5).
schema: see `SCHEMA`.
zd1: see `ZDICT`."""


def agreed(offered: Iterable[str]) -> tuple[str, ...]:
    """The features both the device (`offered`) and this server speak, sorted."""
    return tuple(sorted(set(offered) & SERVER_CAPS))


__all__ = ["SCHEMA", "SERVER_CAPS", "ZDICT", "agreed"]
