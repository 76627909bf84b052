"""Checks of a local write against the collection schema and the device's scopes.

Pure: no I/O. Every check runs before anything is stored and raises `WriteRefused` with
the rejection code the server would answer (PROTOCOL.md §8) and a message naming the
collection, the field and what is wrong, so an app can show it as is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.errors import WriteRefused
from schemas.collection import Catalog, CollectionSpec, FieldSpec
from schemas.wire import MAX_FIELDS_PER_CHANGE, MAX_JSON_DEPTH, MAX_KEY_BYTES, MAX_SAFE_INT

MAX_RECORD_BYTES = 64 * 1024
"""One record as JSON (PROTOCOL.md §3)."""
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1

_CONTROL = re.compile(r"[\x00-\x1f]")


def collection(catalog: Catalog, name: Any) -> CollectionSpec:
    """The spec of collection `name`, or WriteRefused naming the known ones."""
    spec = catalog.collection(name) if isinstance(name, str) else None
    if spec is None:
        known = ", ".join(sorted(catalog.collections)) or "none"
        raise WriteRefused("unknown_collection",
                           f"unknown collection {name!r} (schema version {catalog.version} "
                           f"has: {known})")
    return spec


def record_key(spec: CollectionSpec, key: Any) -> str:
    """`key` if it is a valid record key (1 to 200 UTF-8 bytes, no control characters)."""
    if type(key) is str and key.isascii() and 0 < len(key) <= MAX_KEY_BYTES and (
            key.isprintable()):
        return key  # the usual key: printable ASCII (U+0020 to U+007E)
    if not isinstance(key, str):
        raise WriteRefused("invalid", f"{spec.name}: a record key must be a string, "
                                      f"got {type(key).__name__}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise WriteRefused("invalid",
                           f"{spec.name}: record key {key!r} is not valid UTF-8 text") from None
    if not 1 <= size <= MAX_KEY_BYTES:
        raise WriteRefused("invalid", f"{spec.name}: a record key must be 1 to "
                                      f"{MAX_KEY_BYTES} UTF-8 bytes, got {size}")
    if _CONTROL.search(key):
        raise WriteRefused("invalid", f"{spec.name}: record key {key!r} contains a control "
                                      "character (below U+0020)")
    return key


def priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (
            MIN_PRIORITY <= value <= MAX_PRIORITY):
        raise WriteRefused("invalid", f"priority must be an integer from {MIN_PRIORITY} to "
                                      f"{MAX_PRIORITY}, got {value!r}")
    return value


def _field(spec: CollectionSpec, name: Any) -> FieldSpec:
    fspec = spec.fields.get(name) if isinstance(name, str) else None
    if fspec is None:
        known = ", ".join(spec.fields)
        raise WriteRefused("unknown_field",
                           f"{spec.name} has no field {name!r} (fields: {known})")
    return fspec


def json_value_error(value: Any, depth: int = 1) -> str | None:
    """Why `value` is not a portable JSON value (PROTOCOL.md §3), or None."""
    if depth > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_SAFE_INT else "integer outside the 53-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else "number is not finite"
    if isinstance(value, list | tuple):
        for item in value:
            err = json_value_error(item, depth + 1)
            if err:
                return err
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"object key {key!r} is not a string"
            err = json_value_error(item, depth + 1)
            if err:
                return err
        return None
    return f"{type(value).__name__} is not a JSON value"


def put_fields(spec: CollectionSpec, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The lww/manual values of a put, checked: known fields, right strategy and type."""
    if not isinstance(fields, Mapping):
        raise WriteRefused("invalid", f"{spec.name}: fields must be a mapping of field "
                                      "name to value")
    if not fields:
        raise WriteRefused("invalid", f"{spec.name}: a put must set at least one field")
    if len(fields) > MAX_FIELDS_PER_CHANGE:
        raise WriteRefused("invalid", f"{spec.name}: a put may set at most "
                                      f"{MAX_FIELDS_PER_CHANGE} fields, got {len(fields)}")
    out: dict[str, Any] = {}
    table = spec.field_table
    for name, value in fields.items():
        kind = type(value)
        if (kind is str or kind is int) and type(name) is str:
            # Certainly fine at a glance (see `CollectionSpec.field_table`): a str within
            # the length limit, or a 53-bit int where any number (or any JSON) fits.
            entry = table.get(name)
            if entry is not None and entry[0] in ("lww", "manual"):
                limit = entry[2]
                if limit is not None and (len(value) <= limit if kind is str else (
                        limit < 0 and -MAX_SAFE_INT <= value <= MAX_SAFE_INT)):
                    out[name] = value
                    continue
        fspec = _field(spec, name)
        strategy = fspec.strategy
        if strategy == "counter":
            raise WriteRefused("wrong_strategy",
                               f"{spec.name}.{name} is a counter: change it with increment, "
                               "not by setting a value")
        if strategy == "set":
            raise WriteRefused("wrong_strategy",
                               f"{spec.name}.{name} is a set: change it with add/remove, "
                               "not by setting a value")
        err = fspec.type_error(value) or json_value_error(value)
        if err:
            raise WriteRefused("type_mismatch", f"{spec.name}.{name} ({fspec.type}): {err}")
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def increment(spec: CollectionSpec, name: Any, amount: Any) -> int | float:
    """A checked counter increment (a number, not 0, of the counter's type)."""
    fspec = _field(spec, name)
    if fspec.strategy != "counter":
        raise WriteRefused("wrong_strategy", f"{spec.name}.{name} is not a counter "
                                             f"(merge = {fspec.strategy}): set it with put")
    err = fspec.increment_error(amount)
    if err is None and isinstance(amount, float) and not math.isfinite(amount):
        err = "number is not finite"
    if err is None and isinstance(amount, int) and abs(amount) > MAX_SAFE_INT:
        err = "integer outside the 53-bit range"
    if err:
        raise WriteRefused("type_mismatch", f"{spec.name}.{name} ({fspec.type} counter): {err}")
    if amount == 0:
        raise WriteRefused("invalid", f"{spec.name}.{name}: an increment must not be 0")
    return amount  # type: ignore[no-any-return]


def members(spec: CollectionSpec, name: Any, values: Any) -> list[str]:
    """Checked, de-duplicated members for an add/remove on set field `name`."""
    fspec = _field(spec, name)
    if fspec.strategy != "set":
        raise WriteRefused("wrong_strategy", f"{spec.name}.{name} is not a set "
                                             f"(merge = {fspec.strategy})")
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise WriteRefused("invalid", f"{spec.name}.{name}: members must be a list of strings")
    out: list[str] = []
    for member in values:
        err = fspec.member_error(member)
        if err is None:
            size = len(member.encode("utf-8", "surrogatepass"))
            if not 1 <= size <= MAX_KEY_BYTES:
                err = f"a member must be 1 to {MAX_KEY_BYTES} UTF-8 bytes, got {size}"
        if err:
            raise WriteRefused("type_mismatch", f"{spec.name}.{name} (set): {err}")
        if member not in out:
            out.append(member)
    if not out:
        raise WriteRefused("invalid", f"{spec.name}.{name}: name at least one member")
    return out


def scope_for_write(spec: CollectionSpec, key: str, scopes: Sequence[str],
                    existing: str | None, values: Mapping[str, Any]) -> str:
    """The scope of a write: the record's if it exists, else from the schema's rule.

    Refuses a create without the scope field, a write that would move a record, and a
    scope that is not one of this device's.
    """
    sfield = spec.scope_field
    if existing is not None:
        if sfield is not None and sfield in values and values[sfield] != existing:
            raise WriteRefused("scope_mismatch",
                               f"{spec.name}/{key} is in scope {existing!r}; its scope field "
                               f"{sfield!r} cannot change to {values[sfield]!r} (a record "
                               "never moves between scopes)")
        scope = existing
    elif sfield is not None:
        value = values.get(sfield)
        if value is None:
            raise WriteRefused("invalid",
                               f"{spec.name}/{key} does not exist yet: creating it needs its "
                               f"scope field {sfield!r} (e.g. put {sfield}=<scope>)")
        scope = value
    else:
        assert spec.scope is not None
        scope = spec.scope
    if scope not in scopes:
        raise WriteRefused("scope_denied",
                           f"{spec.name}/{key}: scope {scope!r} is not one of this device's "
                           f"scopes ({', '.join(scopes)})")
    return scope


__all__ = [
    "MAX_PRIORITY",
    "MAX_RECORD_BYTES",
    "MIN_PRIORITY",
    "collection",
    "increment",
    "json_value_error",
    "members",
    "priority",
    "put_fields",
    "record_key",
    "scope_for_write",
]
