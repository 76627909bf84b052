"""The optional protocol features this server serves (PROTOCOL.md §11).

A device lists the features it speaks in `hello.caps`; the server answers with `welcome`
naming the ones both sides speak, and keeps them in the device's row so that it sends a
device nothing it did not agree to. A feature joins `SERVER_CAPS` in the commit that
implements it on the server.
"""

from __future__ import annotations

from collections.abc import Iterable

from schemas import zdict, zdict_recent, zdict_schema

SCHEMA = "schema"
"""The server states its schema versions in `welcome` (`sv`, `sv_min`) and holds back
changes written under a version older than `sv_min` (PROTOCOL.md §11)."""

ZDICT = zdict.CAP
"""Small down messages compressed with the protocol's preset dictionary, and up
messages read that way (§3, `schemas.zdict`)."""

ZD2 = zdict_schema.CAP
"""Up messages compressed with the dictionary derived from the device's schema (§3,
`schemas.zdict_schema`): agreed only when this server holds the dictionary whose id the
`hello` names in `zd` (it has parsed that schema version), so it can read them."""

ZD3 = zdict_recent.CAP
"""The device's `changes` compressed with its own recent messages (§3,
`schemas.zdict_recent`): only with `zd2`, and only where `broker.server.recent` serves it
(a hello offering it elsewhere is read as if it did not)."""

SCHEMA_PUSH = "schema_push"
"""The server sends a device that runs another schema version than the server's the
published version it should run next, in a `schema` message (PROTOCOL.md §7.13), at its
`hello` and when the operator publishes or rolls back while it is online."""

FETCH = "fetch"
"""The server answers `fetch` (records by key) with `fetched` (PROTOCOL.md §7.14)."""

CERT_RENEW = "cert_renew"
"""The server sends the `cert_renew` command (`waystation device renew-cert`), signs the
device's `csr` with the client CA of `[enrol]` and answers with `cert`; `hello.crt` and
`hello.cexp` report the certificate in use (PROTOCOL.md §7.15)."""

FETCH_QUERY = "fetch_query"
"""The server answers `fetchq` (records matching a filter) with `fetchedq` (PROTOCOL.md
§7.14.1)."""

SERVER_CAPS: frozenset[str] = frozenset(
    {"creds", "scopes", "sync", "txn", SCHEMA, SCHEMA_PUSH, FETCH, FETCH_QUERY, CERT_RENEW,
     ZDICT, ZD2, ZD3})
"""creds: `waystation device rotate-password` reaches the device as a `creds` command
(§7.9) and `hello.cred` tells the server it logged in with the new password (§7.1).
scopes: `waystation device scopes` reaches the device as a `scopes` command (§7.9).
sync: `waystation device sync` reaches the device as a `sync` command (§7.9).
txn: transactions applied all or none (§7.2.1, §10.5).
schema: see `SCHEMA`.
schema_push: see `SCHEMA_PUSH`.
fetch: see `FETCH`.
fetch_query: see `FETCH_QUERY`.
cert_renew: see `CERT_RENEW`.
zd1: see `ZDICT`.
zd2: see `ZD2`.
zd3: see `ZD3`."""


def agreed(offered: Iterable[str], *, zd: int | None = None,
           served: frozenset[str] = SERVER_CAPS) -> tuple[str, ...]:
    """The features both the device (`offered`) and this server (`served`: what it serves
    now, `SERVER_CAPS` at most) speak, sorted; `zd2` only when this server knows the
    dictionary `zd` (the hello's) names, `zd3` only with `zd2`."""
    both = set(offered) & served
    if ZD2 in both and not zdict_schema.known(zd):
        both.discard(ZD2)
    if ZD2 not in both:
        both.discard(ZD3)
    return tuple(sorted(both))


def served_now(*, recent_kept: bool, other_servers: int) -> frozenset[str]:
    """What this server agrees to at a hello now: `zd3` only where it keeps the devices'
    recent traffic (`recent_kept`) and no other merge server runs on its store. Servers
    sharing a store share the devices' messages (a shared subscription, competing AMQP
    consumers), so a device's next message would mostly reach a server without its
    references and be refused (`dictionary_unknown`) and sent again: a round trip lost
    per message until the device gave up. Devices that agreed before a second server
    started fall back that way once per connection (PROTOCOL.md §3)."""
    if recent_kept and other_servers == 0:
        return SERVER_CAPS
    return SERVER_CAPS - {ZD3}


__all__ = ["CERT_RENEW", "FETCH", "FETCH_QUERY", "SCHEMA", "SCHEMA_PUSH", "SERVER_CAPS", "ZD2",
           "ZD3", "ZDICT", "agreed", "served_now"]
