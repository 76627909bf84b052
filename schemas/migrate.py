"""Carrying data across declared migrations (schemas.evolution), both ways; pure logic.

Upcast (old -> new) is what the server does to a change written under an older schema
version before merging it; down-projection (new -> old) is what it does to a record it
sends to a device still on an older version, so that the device sees only fields and
types it understands.

Value conversions (`convert`): null stays null in every direction; int -> string writes
decimal digits, string -> int reads them back (`-?[0-9]+` within 53 bits); float <->
string the same with Python's shortest round-trip form; bool <-> string as "true" /
"false"; bool -> int as 1 / 0, int -> bool as `x != 0`; float -> int rounds half to even;
anything -> json keeps the value; json -> a type keeps a value already of that type and
otherwise fails, except json -> string which writes the JSON text. A value that cannot
be converted raises `MigrationError` on upcast (the server refuses that change with
`type_mismatch`, naming the migration); on down-projection the field is left out of
what the old device sees.

Split / merge: `split(v)` is `v.split(sep, n - 1)` padded with nulls to the `n` target
fields; `join(parts)` joins the non-null parts with `sep`; join(split(v)) == v for
every string.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from schemas.collection import Catalog, FieldSpec
from schemas.errors import MigrationError
from schemas.evolution import (
    Convert,
    DropCollection,
    Merge,
    Migration,
    Narrow,
    Remove,
    Rename,
    Split,
    apply_to_schema,
)
from schemas.wire import MAX_SAFE_INT

_INT_RE = re.compile(r"-?[0-9]{1,16}")

Lookup = Callable[[str], Any]
"""The current value of a field of the record a change targets (None: unset)."""


# --- values -------------------------------------------------------------------------


def convert_value(value: Any, src: str, dst: str) -> Any:
    """`value` of type `src` as type `dst`; raises `MigrationError` when it cannot be."""
    if value is None or src == dst:
        return value
    if dst == "json":
        return value
    if dst == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return repr(value)
        if isinstance(value, str):
            return value
        try:
            return orjson.dumps(value).decode()
        except (TypeError, orjson.JSONEncodeError):
            raise MigrationError(f"{_short(value)} cannot be written as JSON") from None
    if dst == "int":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int) and abs(value) <= MAX_SAFE_INT:
            return value
        if isinstance(value, float) and math.isfinite(value) and abs(value) <= MAX_SAFE_INT:
            return round(value)
        if isinstance(value, str) and src == "string" and _INT_RE.fullmatch(value):
            number = int(value)
            if abs(number) <= MAX_SAFE_INT:
                return number
        raise MigrationError(f"{_short(value)} is not an integer")
    if dst == "float":
        if isinstance(value, bool):
            raise MigrationError(f"{_short(value)} is not a number")
        if isinstance(value, int | float):
            return value
        if isinstance(value, str) and src == "string":
            try:
                real = float(value)
            except ValueError:
                real = math.nan
            if math.isfinite(real):
                return real
        raise MigrationError(f"{_short(value)} is not a number")
    if dst == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and src != "json":
            return value != 0
        if isinstance(value, str) and value.lower() in ("true", "false") and src == "string":
            return value.lower() == "true"
        raise MigrationError(f"{_short(value)} is not true / false")
    raise MigrationError(f"cannot convert {src} -> {dst}")


def narrow_value(value: Any, spec: FieldSpec) -> Any:
    """`value` clamped / cut into `spec`'s bounds."""
    if value is None:
        return None
    if isinstance(value, str) and spec.max_length is not None:
        return value[: spec.max_length]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if spec.min is not None and value < spec.min:
            value = type(value)(spec.min)
        if spec.max is not None and value > spec.max:
            value = type(value)(spec.max)
    return value


def split_value(value: Any, sep: str, n: int) -> list[Any]:
    if value is None:
        return [None] * n
    parts: list[Any] = str(value).split(sep, n - 1)
    return parts + [None] * (n - len(parts))


def join_values(parts: Sequence[Any], sep: str) -> Any:
    present = [str(p) for p in parts if p is not None]
    return sep.join(present) if present else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- a step with the specs it needs -------------------------------------------------


class Step:
    """One migration with the field specs of both sides (old version, new version)."""

    __slots__ = ("m", "new", "old", "version")

    def __init__(self, m: Migration, old: Mapping[str, FieldSpec], new: Mapping[str, FieldSpec],
                 version: int) -> None:
        self.m = m
        self.old = old
        self.new = new
        self.version = version


def build_steps(previous: Catalog, versions: Sequence[tuple[Catalog, Sequence[Migration]]]
                ) -> list[Step]:
    """The steps from `previous` through each (catalog, its migrations) in order, each
    with the field specs just before it (earlier renames applied) and in its version."""
    steps: list[Step] = []
    before = previous
    for catalog, migrations in versions:
        derived = {name: dict(spec.fields) for name, spec in before.collections.items()}
        for m in migrations:
            old = dict(derived.get(m.collection, {}))
            target = catalog.collections.get(m.collection)
            new = dict(target.fields) if target is not None else {}
            steps.append(Step(m, old, new, catalog.version))
            partial = apply_to_schema({m.collection: before.collections[m.collection]
                                       .model_copy(update={"fields": old})},
                                      catalog.collections, [m], catalog.source)
            if m.collection in partial:
                derived[m.collection] = dict(partial[m.collection].fields)
            else:
                derived.pop(m.collection, None)
        before = catalog
    return steps


# --- upcast of a change's field groups ----------------------------------------------


def upcast_groups(groups: dict[str, dict[str, Any]], collection: str, steps: Sequence[Step],
                  lookup: Lookup | None = None) -> dict[str, dict[str, Any]]:
    """A change's groups `f` (values), `i` (increments), `a` (set adds), `r` (set
    removes), written under the old version, as the new version names and types them.

    `lookup` gives the record's current value of a field (by its name after the step)
    for a merge whose change sets only some of the merged fields. Raises
    `MigrationError` for a value that cannot be converted.
    """
    f, i, a, r = (dict(groups.get(g, {})) for g in ("f", "i", "a", "r"))
    for step in steps:
        m = step.m
        if m.collection != collection:
            continue
        where = f"{collection}: migration {m.op} to version {step.version}"
        if isinstance(m, Rename):
            for group in (f, i, a, r):
                if m.src in group:
                    group[m.dst] = group.pop(m.src)
        elif isinstance(m, Convert):
            if m.field in f:
                src, dst = step.old[m.field].type, step.new[m.field].type
                try:
                    f[m.field] = convert_value(f[m.field], src, dst)
                except MigrationError as exc:
                    raise MigrationError(f"{where}: field {m.field!r}: {exc}") from None
        elif isinstance(m, Narrow):
            spec = step.new[m.field]
            if m.field in f:
                f[m.field] = narrow_value(f[m.field], spec)
            if m.field in a and spec.max_length is not None:
                kept = [x for x in a[m.field] if len(x) <= spec.max_length]
                if kept:
                    a[m.field] = kept
                else:
                    del a[m.field]
        elif isinstance(m, Remove):
            for group in (f, i, a, r):
                group.pop(m.field, None)
        elif isinstance(m, Split):
            if m.src in f:
                for name, part in zip(m.dst, split_value(f.pop(m.src), m.sep, len(m.dst)),
                                      strict=True):
                    f[name] = part
        elif isinstance(m, Merge):
            if any(name in f for name in m.src):
                if all(name in f for name in m.src):
                    parts = [f.pop(name) for name in m.src]
                else:
                    current = lookup(m.dst) if lookup is not None else None
                    parts = split_value(current, m.sep, len(m.src))
                    for index, name in enumerate(m.src):
                        if name in f:
                            parts[index] = f.pop(name)
                f[m.dst] = join_values(parts, m.sep)
        elif isinstance(m, DropCollection):
            break
    return {"f": f, "i": i, "a": a, "r": r}


def dropped(collection: str, steps: Sequence[Step]) -> bool:
    """True when a step drops `collection`."""
    return any(isinstance(s.m, DropCollection) and s.m.collection == collection for s in steps)


# --- down-projection of a record ----------------------------------------------------


def project_down(rec: dict[str, dict[str, Any]], collection: str, steps: Sequence[Step],
                 old_fields: Mapping[str, FieldSpec] | None,
                 whole: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """A record's per-field maps `f` (values), `h` (stamps), `t` (set tags), `cf`
    (conflict candidates), new version -> old version: `steps` are the steps from the
    old version up, undone last first; `old_fields` are the collection's fields in the
    old version (None: keep every field). `whole` holds every field value of the record
    in the new version (for a partial record whose split fields are not all in it).
    Fields the old version does not know are left out; a value that cannot be
    converted back is left out too (with its stamp), so the old device keeps what it had.
    """
    f, h, t, cf = (dict(rec.get(g, {})) for g in ("f", "h", "t", "cf"))
    full = dict(whole) if whole is not None else dict(f)
    for step in reversed(steps):
        m = step.m
        if m.collection != collection:
            continue
        if isinstance(m, Rename):
            for group in (f, h, t, cf, full):
                if m.dst in group:
                    group[m.src] = group.pop(m.dst)
        elif isinstance(m, Convert):
            src, dst = step.new[m.field].type, step.old[m.field].type
            for group_value in (f, full):
                if m.field in group_value:
                    try:
                        group_value[m.field] = convert_value(group_value[m.field], src, dst)
                    except MigrationError:
                        del group_value[m.field]
                        if group_value is f:
                            h.pop(m.field, None)
            if m.field in cf:
                cands = []
                for cand in cf[m.field]:
                    try:
                        cands.append({**cand, "v": convert_value(cand.get("v"), src, dst)})
                    except MigrationError:
                        continue
                cf[m.field] = cands
        elif isinstance(m, Split):
            # A partial record (a delta) without every part cannot be joined: the old
            # field is left out rather than sent cut short.
            if any(name in f for name in m.dst) and all(
                    name in f or name in full for name in m.dst):
                parts = [f.get(name, full.get(name)) for name in m.dst]
                f[m.src] = join_values(parts, m.sep)
                stamps = [h[name] for name in m.dst if name in h]
                if stamps:
                    h[m.src] = max(stamps)
            full[m.src] = join_values([full.get(name) for name in m.dst], m.sep)
            for name in m.dst:
                for group in (f, h, cf, full):
                    group.pop(name, None)
        elif isinstance(m, Merge):
            if m.dst in f:
                for name, part in zip(m.src, split_value(f.pop(m.dst), m.sep, len(m.src)),
                                      strict=True):
                    f[name] = part
                    if m.dst in h:
                        h[name] = h[m.dst]
                h.pop(m.dst, None)
            if m.dst in full:
                for name, part in zip(m.src, split_value(full.pop(m.dst), m.sep, len(m.src)),
                                      strict=True):
                    full[name] = part
            cf.pop(m.dst, None)
        # narrow: old bounds were wider, the value fits; remove / drop: nothing to undo
    if old_fields is not None:
        for group in (f, h, t, cf):
            for name in [n for n in group if n not in old_fields]:
                del group[name]
    return {"f": f, "h": h, "t": t, "cf": cf}


__all__ = [
    "Lookup",
    "Step",
    "build_steps",
    "convert_value",
    "dropped",
    "join_values",
    "narrow_value",
    "project_down",
    "split_value",
    "upcast_groups",
]
