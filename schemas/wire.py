"""Pydantic models of every wire message (docs/PROTOCOL.md, version 1).

The models are the normative shapes; `schemas.codec` turns bytes into them. Member
names are the short wire names on purpose (metered links); docstrings give the long
meaning. Unknown members are ignored for forward compatibility (PROTOCOL.md §3).

This module holds the messages a device sends (and the retained status and server
state) and the type tables; the shared types and the record state live in
`schemas.wire_types`, the server -> device messages in `schemas.wire_down`. Every name
is re-exported here: import wire models from `schemas.wire`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator

from schemas.wire_down import (
    MAX_SCHEMA_PUSH_TEXT,
    PEM_MAX,
    Ack,
    CertIssued,
    Checkpoint,
    Command,
    Delta,
    ErrorInfo,
    Fetched,
    Page,
    Reject,
    Rejection,
    SchemaPush,
    Welcome,
)
from schemas.wire_types import (
    CHANGE_ID_PATTERN,
    COLLECTION_PATTERN,
    FIELD_KEYS,
    FIELD_PATTERN,
    ID_PATTERN,
    INCARNATION_PATTERN,
    MAX_CHANGES_PER_BATCH,
    MAX_FIELDS_PER_CHANGE,
    MAX_JSON_DEPTH,
    MAX_KEY_BYTES,
    MAX_SAFE_INT,
    PROTOCOL_VERSION,
    STAMP_PATTERN,
    TIME_PART_PATTERN,
    Candidate,
    Capabilities,
    Capability,
    ChangeNumber,
    ChangeTag,
    CollectionName,
    DeviceId,
    FieldName,
    FieldValues,
    Incarnation,
    JsonSchemaOnly,
    JsonValue,
    Member,
    Message,
    Number,
    Rec,
    RecordKey,
    ReqId,
    SchemaVersion,
    ScopeId,
    Seq,
    Stamp,
    TimePart,
    TxMarker,
    WireModel,
    check_field_names,
    json_depth,
    json_value_error,
    required_on_wire,
)

# --- device -> server ---------------------------------------------------------------


class Hello(Message):
    """Sent after every (re)connect; the server answers with pending commands."""

    type: Literal["hello"] = "hello"
    dev: DeviceId
    agent: Annotated[str, Field(max_length=128)]
    sv: SchemaVersion
    z: StrictBool = False
    done: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]],
                    Field(max_length=1000)] = Field(default_factory=list)
    inc: Incarnation | None = None
    """The device store's incarnation (§2); absent: a store from before incarnations."""
    cp: Annotated[dict[ScopeId, Seq], Field(max_length=1000)] | None = None
    """The device's checkpoints now (§9.4), for the operator's view of its progress."""
    caps: Capabilities | None = None
    """The optional features the device speaks (§11); present: the server answers with
    `welcome`. Absent: a v1 device that is sent nothing beyond this document."""
    cred: Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)] | None = None
    """Capability `creds`: the credential rotation (§7.9) whose password this connection
    logged in with; absent: the password the device was enrolled with (or configured)."""
    zd: Annotated[int, Field(ge=0, le=0xFFFFFFFF, strict=True)] | None = None
    """Capability `zd2`: the id (zlib DICTID, adler-32) of the dictionary the device
    derived from its schema (§3); the server agrees to `zd2` only when it holds it."""
    crt: Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)] | None = None
    """Capability `cert_renew` (§7.15): the renewal whose client certificate this
    connection presented; absent: the certificate the device was enrolled with."""
    cexp: Seq | None = None
    """Capability `cert_renew`: when the client certificate this connection presented
    expires (ms since the epoch), for the operator's view."""


_FIELD_GROUPS = ("f", "i", "a", "r")


def _change_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """`b` is required on the wire; a `del` names no field, a `put` at least one (§7.2)."""
    required_on_wire("b")(schema, model)
    schema["if"] = {"properties": {"op": {"const": "del"}}}
    schema["then"] = {"properties": {g: {"maxProperties": 0} for g in _FIELD_GROUPS}}
    schema["else"] = {"anyOf": [{"required": [g], "properties": {g: {"minProperties": 1}}}
                                for g in _FIELD_GROUPS]}


class Change(WireModel):
    """One versioned local write (PROTOCOL.md §7.2)."""

    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_extra=_change_schema)

    n: ChangeNumber
    h: TimePart
    c: CollectionName
    k: RecordKey
    s: ScopeId
    b: Seq = 0
    op: Literal["put", "del"]
    f: Annotated[FieldValues, JsonSchemaOnly(maxProperties=MAX_FIELDS_PER_CHANGE)] = Field(
        default_factory=dict)
    i: Annotated[dict[str, Annotated[Number, JsonSchemaOnly(**{"not": {"const": 0}})]],
                 AfterValidator(check_field_names), FIELD_KEYS,
                 JsonSchemaOnly(maxProperties=MAX_FIELDS_PER_CHANGE)] = Field(
        default_factory=dict)
    a: Annotated[dict[str, Annotated[list[Member], JsonSchemaOnly(minItems=1)]],
                 AfterValidator(check_field_names), FIELD_KEYS,
                 JsonSchemaOnly(maxProperties=MAX_FIELDS_PER_CHANGE)] = Field(
        default_factory=dict)
    r: Annotated[dict[str, Annotated[dict[Member, list[ChangeTag]],
                                     JsonSchemaOnly(minProperties=1)]],
                 AfterValidator(check_field_names), FIELD_KEYS,
                 JsonSchemaOnly(maxProperties=MAX_FIELDS_PER_CHANGE)] = Field(
        default_factory=dict)
    tx: TxMarker | None = None
    """Capability `txn` (§7.2.1): [transaction id, count] -- this change belongs to the
    transaction whose first change number is the id; `count` changes of it travel in this
    message, next to each other, and the server applies them all or none."""

    @model_validator(mode="after")
    def _shape(self) -> Change:
        if self.op == "del":
            if self.f or self.i or self.a or self.r:
                raise ValueError("a 'del' change must not name fields")
            return self
        if not self.i and not self.a and not self.r:  # the usual put: values only
            named = len(self.f)
            if named == 0:
                raise ValueError("a 'put' change must name at least one field")
            if named > MAX_FIELDS_PER_CHANGE:
                raise ValueError(f"a change may name at most {MAX_FIELDS_PER_CHANGE} fields")
            return self
        named = len(self.f) + len(self.i) + len(set(self.a) | set(self.r))
        if named == 0:
            raise ValueError("a 'put' change must name at least one field")
        if named > MAX_FIELDS_PER_CHANGE:
            raise ValueError(f"a change may name at most {MAX_FIELDS_PER_CHANGE} fields")
        groups = [set(self.f), set(self.i), set(self.a) | set(self.r)]
        seen: set[str] = set()
        for group in groups:
            both = seen & group
            if both:
                raise ValueError(f"field {sorted(both)[0]!r} appears in more than one of f/i/a/r")
            seen |= group
        for name, inc in self.i.items():
            if inc == 0:
                raise ValueError(f"increment of {name!r} must not be 0")
            if isinstance(inc, int) and abs(inc) > MAX_SAFE_INT:
                raise ValueError(f"increment of {name!r} is outside the 53-bit range")
        for name, members in self.a.items():
            if not members:
                raise ValueError(f"set add of {name!r} names no members")
        for name, removes in self.r.items():
            if not removes:
                raise ValueError(f"set remove of {name!r} names no members")
            if name in self.a and not removes.keys().isdisjoint(self.a[name]):
                raise ValueError(f"set field {name!r} adds and removes the same member")
        return self


class Changes(Message):
    """A change batch from one device."""

    type: Literal["changes"] = "changes"
    dev: DeviceId
    sv: SchemaVersion
    ch: Annotated[list[Change], Field(min_length=1, max_length=MAX_CHANGES_PER_BATCH)]
    inc: Incarnation | None = None
    """The incarnation the changes were written in (§2); absent: the legacy one."""


class Catchup(Message):
    """A device asks for everything after its per-scope checkpoints."""

    type: Literal["catchup"] = "catchup"
    dev: DeviceId
    req: ReqId
    cp: Annotated[dict[ScopeId, Seq], Field(max_length=1000)]
    snap: Annotated[list[ScopeId], Field(max_length=1000)] = Field(default_factory=list)
    lim: Annotated[int, Field(ge=1, le=5000, strict=True)] = 1000

MAX_FETCH_KEYS = 100
"""Keys one `fetch` may ask for (§7.14)."""


class Fetch(Message):
    """A device asks for records by key (capability `fetch`, §7.14): records it evicted
    (retention) and wants back. Answered by one or more `fetched`."""

    type: Literal["fetch"] = "fetch"
    dev: DeviceId
    req: ReqId
    c: CollectionName
    k: Annotated[list[RecordKey], Field(min_length=1, max_length=MAX_FETCH_KEYS)]


MAX_PEM = PEM_MAX
"""The longest PEM text a `csr` or `cert` message carries (§7.15): an EC P-256 request or
certificate is under 1 KiB; the bound leaves room for a CA certificate with extensions."""


class Csr(Message):
    """Capability `cert_renew` (§7.15): a certificate signing request for a new client
    key the device made; the key itself never leaves the device. Answered by `cert`."""

    type: Literal["csr"] = "csr"
    dev: DeviceId
    rid: Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)]
    """The renewal: the one the operator's `cert_renew` command named, or one the device
    started itself because its certificate expires soon."""
    csr: Annotated[str, Field(min_length=1, max_length=MAX_PEM)]
    """PKCS#10 request in PEM: subject CN = the device id, an EC P-256 key."""


# --- device -> everyone (retained) ---------------------------------------------------


class Status(Message):
    """Presence, retained on the device's status topic (and its last will)."""

    type: Literal["status"] = "status"
    dev: DeviceId
    on: StrictBool
    agent: Annotated[str, Field(max_length=128)] | None = None
    sv: SchemaVersion | None = None
    t: Seq | None = None
    pend: Seq | None = None
    old: Seq | None = None
    dl: Seq | None = None


# --- server -> everyone (retained) ---------------------------------------------------


class ServerState(Message):
    """A merge server's announcement, retained on `{prefix}/_server/{grp}/{srv}/state`
    (and its last will, `on: false`), §7.12."""

    type: Literal["server"] = "server"
    grp: DeviceId
    srv: DeviceId
    on: StrictBool
    t: Seq | None = None


UP_TYPES: dict[str, type[Message]] = {"hello": Hello, "changes": Changes, "catchup": Catchup,
                                      "fetch": Fetch, "csr": Csr}
DOWN_TYPES: dict[str, type[Message]] = {
    "ack": Ack,
    "reject": Reject,
    "delta": Delta,
    "page": Page,
    "checkpoint": Checkpoint,
    "fetched": Fetched,
    "cert": CertIssued,
    "command": Command,
    "welcome": Welcome,
    "schema": SchemaPush,
}
STATUS_TYPES: dict[str, type[Message]] = {"status": Status}
SERVER_TYPES: dict[str, type[Message]] = {"server": ServerState}
ALL_TYPES: dict[str, type[Message]] = {**UP_TYPES, **DOWN_TYPES, **STATUS_TYPES,
                                       **SERVER_TYPES}

__all__ = [
    "ALL_TYPES",
    "CHANGE_ID_PATTERN",
    "COLLECTION_PATTERN",
    "DOWN_TYPES",
    "FIELD_PATTERN",
    "ID_PATTERN",
    "INCARNATION_PATTERN",
    "MAX_CHANGES_PER_BATCH",
    "MAX_FETCH_KEYS",
    "MAX_FIELDS_PER_CHANGE",
    "MAX_JSON_DEPTH",
    "MAX_KEY_BYTES",
    "MAX_PEM",
    "MAX_SAFE_INT",
    "MAX_SCHEMA_PUSH_TEXT",
    "PROTOCOL_VERSION",
    "SERVER_TYPES",
    "STAMP_PATTERN",
    "STATUS_TYPES",
    "TIME_PART_PATTERN",
    "UP_TYPES",
    "Ack",
    "Candidate",
    "Capabilities",
    "Capability",
    "Catchup",
    "CertIssued",
    "Change",
    "ChangeNumber",
    "ChangeTag",
    "Changes",
    "Checkpoint",
    "CollectionName",
    "Command",
    "Csr",
    "Delta",
    "DeviceId",
    "ErrorInfo",
    "Fetch",
    "Fetched",
    "FieldName",
    "FieldValues",
    "Hello",
    "Incarnation",
    "JsonSchemaOnly",
    "JsonValue",
    "Member",
    "Message",
    "Number",
    "Page",
    "Rec",
    "RecordKey",
    "Reject",
    "Rejection",
    "ReqId",
    "SchemaPush",
    "SchemaVersion",
    "ScopeId",
    "Seq",
    "ServerState",
    "Stamp",
    "Status",
    "TimePart",
    "TxMarker",
    "Welcome",
    "WireModel",
    "json_depth",
    "json_value_error",
    "required_on_wire",
]
