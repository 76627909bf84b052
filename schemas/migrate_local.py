"""A device's own data carried to another schema version (issue 10 §1); pure logic.

When a device takes a new published version (PROTOCOL.md §7.13) it rewrites what it
holds in that version's names and types, in one local transaction: its base records
(per-field maps: `f` values, `fq` per-field versions, `h` stamps, `t` set tags, `cf`
conflict candidates) go up along the declared migrations (`upcast_record`), its pending
changes with `schemas.migrate.upcast_groups`. When the server rolls a version back, the
device goes down again (`downcast_record`, `downcast_groups`), as the server's
down-projection does for records it sends to older devices.

A value a conversion cannot carry is left out with its stamp and version (the record
then shows no value for that field until the server sends one), never guessed.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from schemas.collection import Catalog, FieldSpec, parse_catalog
from schemas.errors import CollectionSchemaError, MigrationError
from schemas.evolution import (
    Convert,
    DropCollection,
    Merge,
    Migration,
    Narrow,
    Remove,
    Rename,
    Split,
    parse_migrations,
)
from schemas.migrate import (
    Step,
    convert_value,
    join_values,
    narrow_value,
    project_down,
    split_value,
)

RECORD_MAPS = ("f", "fq", "h", "t", "cf")
"""A base record's per-field maps, all keyed by field name."""
CHANGE_GROUPS = ("f", "i", "a", "r")
"""A change's field groups: values, counter increments, set adds, set removes."""


def parse_version(text: str, source: str, max_chars: int) -> tuple[Catalog, tuple[Migration, ...]]:
    """A published schema file's text -> (catalog, its migrations from the version
    before); `CollectionSchemaError` naming `source` when it is not one."""
    if len(text) > max_chars:
        raise CollectionSchemaError(f"{source}: {len(text)} characters; at most {max_chars}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CollectionSchemaError(f"{source}: not valid TOML ({exc})") from None
    return parse_catalog(data, source), parse_migrations(data.get("migrations"), source)


def _drop(maps: dict[str, dict[str, Any]], name: str) -> None:
    for group in maps.values():
        group.pop(name, None)


def upcast_record(maps: Mapping[str, Mapping[str, Any]], collection: str,
                  steps: Sequence[Step]) -> dict[str, dict[str, Any]] | None:
    """A base record's field maps (`RECORD_MAPS`) in the newer version's names and
    types; None when a step drops the collection."""
    out = {g: dict(maps.get(g, {})) for g in RECORD_MAPS}
    f, fq, h = out["f"], out["fq"], out["h"]
    for step in steps:
        m = step.m
        if m.collection != collection:
            continue
        if isinstance(m, DropCollection):
            return None
        if isinstance(m, Rename):
            for group in out.values():
                if m.src in group:
                    group[m.dst] = group.pop(m.src)
        elif isinstance(m, Convert):
            _convert(out, m.field, step.old[m.field].type, step.new[m.field].type)
        elif isinstance(m, Narrow):
            if m.field in f and not isinstance(f[m.field], list | dict):
                try:
                    f[m.field] = narrow_value(f[m.field], step.new[m.field])
                except (MigrationError, TypeError, ValueError):
                    _drop(out, m.field)
        elif isinstance(m, Remove):
            _drop(out, m.field)
        elif isinstance(m, Split):
            if m.src in f:
                parts = split_value(f.pop(m.src), m.sep, len(m.dst))
                for name, part in zip(m.dst, parts, strict=True):
                    f[name] = part
                    for meta in (fq, h):
                        if m.src in meta:
                            meta[name] = meta[m.src]
            for group in out.values():
                group.pop(m.src, None)
        elif isinstance(m, Merge):
            if any(name in f for name in m.src):
                f[m.dst] = join_values([f.get(name) for name in m.src], m.sep)
                for meta in (fq, h):
                    present = [meta[name] for name in m.src if name in meta]
                    if present:
                        meta[m.dst] = max(present)
            for name in m.src:
                _drop(out, name)
    return out


def _convert(out: dict[str, dict[str, Any]], name: str, src: str, dst: str) -> None:
    f = out["f"]
    if name in f:
        try:
            f[name] = convert_value(f[name], src, dst)
        except MigrationError:
            _drop(out, name)
            return
    if name in out["cf"]:
        cands = []
        for cand in out["cf"][name]:
            try:
                cands.append({**cand, "v": convert_value(cand.get("v"), src, dst)})
            except MigrationError:
                continue
        out["cf"][name] = cands


def downcast_record(maps: Mapping[str, Mapping[str, Any]], collection: str,
                    steps: Sequence[Step], old_fields: Mapping[str, FieldSpec]
                    ) -> dict[str, dict[str, Any]]:
    """A base record's field maps in the older version's names and types (`steps` go
    from the older version up): `schemas.migrate.project_down`, with the per-field
    versions `fq` carried like the stamps."""
    rec = {g: dict(maps.get(g, {})) for g in ("f", "h", "t", "cf")}
    down = project_down(rec, collection, steps, old_fields)
    versions = project_down({"f": dict(maps.get("f", {})), "h": dict(maps.get("fq", {}))},
                            collection, steps, old_fields)
    return {**down, "fq": {k: v for k, v in versions["h"].items() if k in down["f"]}}


def downcast_groups(groups: Mapping[str, Mapping[str, Any]], collection: str,
                    steps: Sequence[Step], old_fields: Mapping[str, FieldSpec]
                    ) -> dict[str, dict[str, Any]]:
    """A pending change's groups (`CHANGE_GROUPS`) in the older version's names and
    types: values as `project_down` carries them; increments, set adds and removes
    renamed back; fields the older version does not know left out."""
    values = project_down({"f": dict(groups.get("f", {}))}, collection, steps, old_fields)["f"]
    out: dict[str, dict[str, Any]] = {"f": values}
    for g in ("i", "a", "r"):
        group = dict(groups.get(g, {}))
        for step in reversed(steps):
            m = step.m
            if m.collection == collection and isinstance(m, Rename) and m.dst in group:
                group[m.src] = group.pop(m.dst)
        out[g] = {k: v for k, v in group.items() if k in old_fields}
    return out


__all__ = [
    "CHANGE_GROUPS",
    "RECORD_MAPS",
    "downcast_groups",
    "downcast_record",
    "parse_version",
    "upcast_record",
]
