"""Shared pieces of the wire models: limits, patterns, value checks, the constrained
types every message is built from, the envelope, and the record state (PROTOCOL.md §3,
§6). The messages themselves are in `schemas.wire` (device -> server, status, server
state) and `schemas.wire_down` (server -> device); import them from `schemas.wire`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_serializer,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

PROTOCOL_VERSION = 1

# |x| < 2^53 keeps integers exact in every JSON reader (PROTOCOL.md §3).
MAX_SAFE_INT = 2**53 - 1
MAX_CHANGES_PER_BATCH = 1000
MAX_FIELDS_PER_CHANGE = 256
MAX_JSON_DEPTH = 32
MAX_KEY_BYTES = 200

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
COLLECTION_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
TIME_PART_PATTERN = r"^[0-9a-f]{16}$"
# A full stamp's node is a device id or the server's reserved node `~server`.
STAMP_PATTERN = r"^[0-9a-f]{16}:(~server|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"
CHANGE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}:[1-9][0-9]{0,15}$"
# A store incarnation (PROTOCOL.md §2): random, created with every device store.
INCARNATION_PATTERN = r"^[A-Za-z0-9_-]{8,32}$"

_CONTROL = re.compile(r"[\x00-\x1f]")
_FIELD_RE = re.compile(FIELD_PATTERN)


def _check_member(value: str) -> str:
    """A set member: 1 to 200 UTF-8 bytes (PROTOCOL.md §2; control characters allowed)."""
    if value.isascii() and 0 < len(value) <= MAX_KEY_BYTES:
        return value  # the usual member: one byte per character
    size = len(value.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= MAX_KEY_BYTES:
        raise ValueError(f"must be 1 to {MAX_KEY_BYTES} UTF-8 bytes, got {size}")
    return value


def _check_key(value: str) -> str:
    """A record key: a member that also has no character below U+0020."""
    if value.isascii() and 0 < len(value) <= MAX_KEY_BYTES and value.isprintable():
        return value  # the usual key: printable ASCII (U+0020 to U+007E)
    _check_member(value)
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (below U+0020)")
    return value


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a decoded JSON value; stops counting past `limit`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def json_value_error(value: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why `value` is not a JSON value this protocol can carry, or None if it is one.

    Checks types (None, bool, int, float, str, list, dict with str keys), integers
    within the signed 53-bit range, finite floats and the nesting depth (§3).
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if not -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
                return "integer outside the signed 53-bit range"
        elif kind is float:
            if not math.isfinite(item):
                return "float must be finite"
        elif kind is dict or kind is list:
            if depth >= limit and item:
                return f"value nested deeper than {limit} levels"
            if kind is dict:
                for key in item:
                    if type(key) is not str:
                        return "object keys must be strings"
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        else:
            return f"{kind.__name__} is not a JSON value"
    return None


def _check_value(value: Any) -> Any:
    error = json_value_error(value)
    if error is not None:
        raise ValueError(error)
    return value


def _check_number(value: Any) -> Any:
    kind = type(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return value
    raise ValueError("must be a number (an integer or a finite float)")


def check_field_names(value: dict[str, Any]) -> dict[str, Any]:
    for name in value:
        if name not in _FIELD_NAMES_SEEN and not _field_name_ok(name):
            raise ValueError(f"{name[:80]!r} is not a valid field name")
    return value


# Field names seen valid: a fleet uses few, so most checks are one set lookup. Bounded
# (the names come from the wire); only exact `str` objects are remembered.
_FIELD_NAMES_SEEN: set[str] = set()
_FIELD_NAMES_MAX = 4096


def _field_name_ok(name: str) -> bool:
    if not _FIELD_RE.fullmatch(name):
        return False
    if type(name) is str:
        if len(_FIELD_NAMES_SEEN) >= _FIELD_NAMES_MAX:
            _FIELD_NAMES_SEEN.clear()
        _FIELD_NAMES_SEEN.add(name)
    return True


def _fast_field_values(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """`dict[str, JsonValue]` with valid field names, checked in one pass.

    The usual map of field name -> plain value (a string, null, a boolean, a 53-bit
    integer, a float) is accepted here in one call instead of one validator call per
    value; anything else (other types, nested values, a bad name, a non-dict) goes
    through the full validation (`handler`), which also words the errors.
    """
    if type(value) is not dict:
        return handler(value)
    seen = _FIELD_NAMES_SEEN
    for name, item in value.items():
        if type(name) is not str or (name not in seen and not _field_name_ok(name)):
            return handler(value)
        kind = type(item)
        if kind is str or item is None or kind is bool:
            continue
        if kind is int:
            if -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
                continue
            return handler(value)
        if kind is float:
            if math.isfinite(item):
                continue
            return handler(value)
        if json_value_error(item) is not None:
            return handler(value)
    return dict(value)


# --- the published JSON Schema (schemas/json/, `python -m schemas.export`) -------------
# It describes what a sender MUST send (PROTOCOL.md §7); the models stay as lenient as §3
# lets a receiver be. Rules the validators check in code are restated for the schema
# here, next to the types, without changing what the models accept.


class JsonSchemaOnly:
    """Annotation metadata adding JSON Schema keywords to a type; validation unchanged."""

    def __init__(self, **keywords: Any) -> None:
        self.keywords = keywords

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema.update(self.keywords)
        return schema


def required_on_wire(*names: str) -> Any:
    """`json_schema_extra` for a model whose members `names` have a default for lenient
    reading but MUST be sent (PROTOCOL.md §3): lists them as required, in member order."""

    def extra(schema: dict[str, Any], model: type[BaseModel]) -> None:
        wanted = set(schema.get("required", ())) | set(names)
        order = [f.alias or name for name, f in model.model_fields.items()]
        schema["required"] = [name for name in order if name in wanted]
        for name in names:  # a default would suggest the member may be left out
            schema["properties"][name].pop("default", None)

    return extra


FIELD_KEYS = JsonSchemaOnly(propertyNames={"pattern": FIELD_PATTERN})
"""A map keyed by field names (`f`, `i`, `a`, `r`, `h`, `t`, `cf`)."""
_NODE_PATTERN = r"^(~server|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"

DeviceId = Annotated[str, Field(pattern=ID_PATTERN)]
ScopeId = Annotated[str, Field(pattern=ID_PATTERN)]
CollectionName = Annotated[str, Field(pattern=COLLECTION_PATTERN)]
FieldName = Annotated[str, Field(pattern=FIELD_PATTERN)]
RecordKey = Annotated[str, AfterValidator(_check_key), JsonSchemaOnly(
    minLength=1, maxLength=MAX_KEY_BYTES, pattern="^[^\\u0000-\\u001f]+$",
    description=f"1 to {MAX_KEY_BYTES} UTF-8 bytes (maxLength bounds the characters), "
                "no character below U+0020")]
Member = Annotated[str, AfterValidator(_check_member), JsonSchemaOnly(
    minLength=1, maxLength=MAX_KEY_BYTES,
    description=f"1 to {MAX_KEY_BYTES} UTF-8 bytes (maxLength bounds the characters)")]
TimePart = Annotated[str, Field(pattern=TIME_PART_PATTERN)]
Stamp = Annotated[str, Field(pattern=STAMP_PATTERN)]
ChangeTag = Annotated[str, Field(pattern=CHANGE_ID_PATTERN)]
Incarnation = Annotated[str, Field(pattern=INCARNATION_PATTERN, strict=True)]
ChangeNumber = Annotated[int, Field(ge=1, le=MAX_SAFE_INT, strict=True)]
TxMarker = Annotated[tuple[ChangeNumber, Annotated[int, Field(ge=1, le=MAX_CHANGES_PER_BATCH,
                                                             strict=True)]],
                     Field(description="[transaction id (its first change number), count of "
                                       "its changes in this message]")]
Seq = Annotated[int, Field(ge=0, le=MAX_SAFE_INT, strict=True)]
SchemaVersion = Annotated[int, Field(ge=0, le=MAX_SAFE_INT, strict=True)]
JsonValue = Annotated[Any, AfterValidator(_check_value)]
# The before-validator gives one clear error instead of one per union member.
Number = Annotated[
    StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)], BeforeValidator(_check_number)
]
ReqId = Annotated[str, Field(min_length=1, max_length=64, strict=True)]
# Field name -> JSON value (the `f` of changes and record states).
FieldValues = Annotated[dict[str, JsonValue], AfterValidator(check_field_names),
                        WrapValidator(_fast_field_values), FIELD_KEYS]


class WireModel(BaseModel):
    """Base of every wire model: ignore unknown members, never coerce scalars.

    Scalars are strict (no "1" -> 1, no 1 -> True); containers stay lax so that JSON
    arrays validate as tuples.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(WireModel):
    """Common envelope: every message names its type and protocol version."""

    v: Literal[1] = 1


# --- record states (PROTOCOL.md §6) -------------------------------------------------


class Candidate(WireModel):
    """One concurrent value of a `manual` field whose conflict is open."""

    model_config = ConfigDict(extra="ignore", frozen=True,
                              json_schema_extra=required_on_wire("v"))

    v: JsonValue = None
    by: Annotated[str, JsonSchemaOnly(pattern=_NODE_PATTERN)]
    h: Stamp

    @model_serializer(mode="wrap")
    def _keep_v(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A null candidate value is a value: `codec.encode` leaves out members at their
        # defaults, but `v` is required on the wire (§6).
        out: dict[str, Any] = handler(self)
        out.setdefault("v", self.v)
        return out


class Rec(WireModel):
    """A record state: the record as of sequence `q` (whole, or only changed fields)."""

    c: CollectionName
    k: RecordKey
    s: ScopeId
    q: Seq
    part: StrictBool = False
    x: StrictBool = False
    xh: Stamp | None = None
    f: FieldValues = Field(default_factory=dict)
    h: Annotated[dict[str, Stamp], AfterValidator(check_field_names), FIELD_KEYS] = Field(
        default_factory=dict)
    t: Annotated[dict[str, dict[Member, list[ChangeTag]]],
                 AfterValidator(check_field_names), FIELD_KEYS] = Field(default_factory=dict)
    cf: Annotated[dict[str, list[Candidate]], AfterValidator(check_field_names),
                  FIELD_KEYS] = Field(default_factory=dict)

    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_extra={
        # `xh` is there exactly when `x` is true (§6).
        "if": {"properties": {"x": {"const": True}}, "required": ["x"]},
        "then": {"required": ["xh"]},
        "else": {"not": {"required": ["xh"]}},
    })


Capability = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
"""The name of an optional protocol feature (§11), e.g. ``txn``."""
Capabilities = Annotated[list[Capability], Field(max_length=32)]
