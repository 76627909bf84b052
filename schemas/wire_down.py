"""Wire models of the messages the server sends a device on its down topic
(PROTOCOL.md §7.4 to §7.9, §7.13, §7.14, §11). Re-exported by `schemas.wire`, where
callers import them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StrictBool

from schemas.wire_types import (
    ID_PATTERN,
    Capabilities,
    ChangeNumber,
    CollectionName,
    JsonValue,
    Message,
    Rec,
    RecordKey,
    ReqId,
    SchemaVersion,
    ScopeId,
    Seq,
    WireModel,
    required_on_wire,
)


class Ack(Message):
    """Changes applied: `[n, scope, q]` each, plus states the device could not know."""

    type: Literal["ack"] = "ack"
    ok: list[tuple[ChangeNumber, ScopeId, Seq]]
    fx: list[Rec] = Field(default_factory=list)
    rs: list[ChangeNumber] = Field(default_factory=list)


class ErrorInfo(WireModel):
    code: Annotated[str, Field(min_length=1, max_length=64)]
    reason: Annotated[str, Field(max_length=2000)]


class Rejection(WireModel):
    n: ChangeNumber
    code: Annotated[str, Field(min_length=1, max_length=64)]
    reason: Annotated[str, Field(max_length=2000)]
    perm: StrictBool
    rec: Rec | None = None


class Reject(Message):
    """Changes not applied (per change), or a message-level error."""

    model_config = ConfigDict(extra="ignore", frozen=True,
                              json_schema_extra=required_on_wire("rj"))

    type: Literal["reject"] = "reject"
    rj: list[Rejection] = Field(default_factory=list)
    err: ErrorInfo | None = None


class Delta(Message):
    """Live record states for changes other devices just made in this device's scopes."""

    type: Literal["delta"] = "delta"
    d: list[Rec]


class Page(Message):
    """One page of a catch-up answer for one scope."""

    type: Literal["page"] = "page"
    req: ReqId
    s: ScopeId
    from_: Seq = Field(alias="from")
    to: Seq
    reset: StrictBool = False
    more: StrictBool = False
    recs: list[Rec] = Field(default_factory=list)

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True,
                              json_schema_extra=required_on_wire("reset", "more", "recs"))


class Fetched(Message):
    """The answer to a `fetch` (§7.14): whole record states of the keys found in the
    device's scopes (`recs`), and the keys the server does not hold for this device
    (`miss`: never written, purged, or outside its scopes -- not told apart). A large
    answer comes in several messages with the same `req`; each may be applied alone."""

    type: Literal["fetched"] = "fetched"
    req: ReqId
    c: CollectionName
    recs: list[Rec] = Field(default_factory=list)
    miss: Annotated[list[RecordKey], Field(max_length=100)] = Field(default_factory=list)

    model_config = ConfigDict(extra="ignore", frozen=True,
                              json_schema_extra=required_on_wire("recs", "miss"))


class Checkpoint(Message):
    """Catch-up complete: the device has everything up to these sequences."""

    type: Literal["checkpoint"] = "checkpoint"
    req: ReqId
    cp: dict[ScopeId, Seq]
    denied: list[ScopeId] = Field(default_factory=list)


class Command(Message):
    """An order from the operator: wipe local data, resync from zero, ping, follow other
    scopes (`scopes`), sync now (`sync`: lift the device's sync policy for a while), or
    log in to the broker with a new password from now on (`creds`), renew the client
    certificate (`cert_renew`, §7.15); `scopes`, `sync`, `creds` and `cert_renew` only to
    a device that agreed to the capability of that name."""

    type: Literal["command"] = "command"
    id: Annotated[str, Field(min_length=1, max_length=64)]
    cmd: Literal["wipe", "resync", "ping", "scopes", "sync", "creds", "cert_renew"]
    args: dict[str, JsonValue] = Field(default_factory=dict)


PEM_MAX = 8192
"""The longest PEM text a `cert` message carries (`schemas.wire.MAX_PEM`)."""


class CertIssued(Message):
    """Capability `cert_renew` (§7.15): the client certificate the server signed for a
    device's `csr`, and the CA certificate that signed it."""

    type: Literal["cert"] = "cert"
    rid: Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)]
    cert: Annotated[str, Field(min_length=1, max_length=PEM_MAX)]
    """The certificate, PEM: CN = the device id, the key of the device's request."""
    ca: Annotated[str, Field(min_length=1, max_length=PEM_MAX)]
    """The CA certificate that signed it, PEM: the device checks that it also signed the
    certificate it holds now (the trust anchor the operator installed)."""


class Welcome(Message):
    """The server's answer to a `hello` that carries `caps`: the features agreed."""

    type: Literal["welcome"] = "welcome"
    caps: Capabilities
    srv: Annotated[str, Field(max_length=128)] = ""
    sv: SchemaVersion | None = None
    """With the `schema` capability: the collection-schema version the server runs."""
    sv_min: SchemaVersion | None = None
    """With the `schema` capability: the oldest schema version whose changes the server
    upcasts (its oldest published version); absent: the server states none."""



MAX_SCHEMA_PUSH_TEXT = 65_536
"""The longest schema file text a `schema` message carries, in characters (a fleet schema
is a few KiB; with JSON escaping it stays under the 256 KiB payload limit)."""


class SchemaPush(Message):
    """Capability `schema_push` (§7.13): a published collection-schema version for the
    device to run, the schema file's TOML text as published (its `[[migrations]]`
    from the version before included)."""

    type: Literal["schema"] = "schema"
    sv: SchemaVersion
    text: Annotated[str, Field(min_length=1, max_length=MAX_SCHEMA_PUSH_TEXT)]
