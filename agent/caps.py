"""The optional protocol features this agent speaks (PROTOCOL.md §11).

Offered in every `hello`; the server's `welcome` says which of them it serves too, and
the agent uses a feature on the wire only once it is agreed (`Sync.server_caps`). A
feature joins `AGENT_CAPS` in the commit that implements it in the agent.
"""

from __future__ import annotations

from schemas import zdict, zdict_recent, zdict_schema

ZDICT = zdict.CAP
ZD2 = zdict_schema.CAP
"""Up messages compressed with the dictionary derived from this device's schema (§3)."""
ZD3 = zdict_recent.CAP
"""`changes` compressed with the `zd2` dictionary and this device's last answered change
messages (§3, agent.up_packing)."""
SCHEMA = "schema"
"""The server states its schema versions in `welcome`; a device older than `sv_min`
holds its changes back until it is upgraded (PROTOCOL.md §11)."""

SCHEMA_PUSH = "schema_push"
"""The server sends the published schema version to run next in a `schema` message; the
agent takes it in one store transaction and says so in a new `hello` (PROTOCOL.md §7.13,
agent.schema_update)."""

FETCH = "fetch"
"""The agent asks for evicted records by key (`fetch`, answered by `fetched`, §7.14)."""

CERT_RENEW = "cert_renew"
"""The agent renews its client certificate: a new key made on the device, a `csr` up, the
signed `cert` down (§7.15, agent.clientcert); `hello.crt`/`cexp` say which one it uses."""

FETCH_QUERY = "fetch_query"
"""The agent asks for records matching a filter (`fetchq`, answered by `fetchedq`,
§7.14.1; agent.fetch_queries)."""

AGENT_CAPS: frozenset[str] = frozenset(
    {"creds", "scopes", "sync", "txn", SCHEMA, SCHEMA_PUSH, FETCH, FETCH_QUERY, CERT_RENEW,
     ZDICT, ZD2, ZD3})
"""creds: the `creds` command (§7.9), a new broker password, and `hello.cred` (§7.1).
scopes: the `scopes` command (§7.9), the operator changing what the device follows.
sync: the `sync` command (§7.9), the operator's "sync now".
txn: transactions sent as units (§7.2.1; agent.txn_sync).
schema: the server's schema versions in `welcome` (§11).
schema_push: see `SCHEMA_PUSH`.
fetch: see `FETCH`.
fetch_query: see `FETCH_QUERY`.
cert_renew: see `CERT_RENEW`.
zd1: small messages compressed with the protocol's preset dictionary, both ways (§3,
schemas.zdict).
zd2: see `ZD2` (the dictionary's id goes in `hello.zd`).
zd3: see `ZD3`."""

__all__ = ["AGENT_CAPS", "CERT_RENEW", "FETCH", "FETCH_QUERY", "SCHEMA", "SCHEMA_PUSH", "ZD2",
           "ZD3", "ZDICT"]
