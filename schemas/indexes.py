"""Index declarations of a collection schema: which fields a device keeps ordered.

    [collections.tasks]
    scope_field = "route"
    indexes = ["status", ["route", "eta"], ["$scope", "status", "eta"]]

Each entry is one field name, or a list of field names (a compound index, ordered by
the first field, then the next, ...). ``$scope`` names the record's scope (useful for
collections with a fixed `scope`, whose scope is not a field). Indexes are local to
each device: they change nothing on the wire and need no schema version bump; a device
builds an index added to its schema when the agent next opens the store, and drops one
that was removed (see `agent.query`).

Pure: no I/O. `check_indexes` raises ValueError with a message naming the index and
field; `schemas.collection.parse_catalog` adds the file and collection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from schemas.collection import FieldSpec

SCOPE_FIELD = "$scope"
"""The pseudo-field naming a record's scope in an index or a query."""
MAX_INDEXES = 16
"""Indexes per collection (every index costs each write of the collection)."""
MAX_INDEX_FIELDS = 8

ORDERABLE_TYPES = frozenset({"string", "int", "float", "bool", "set"})


class IndexSpec(BaseModel):
    """One declared index: the fields it orders records by, in that order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fields: tuple[str, ...]

    @property
    def name(self) -> str:
        """How messages and query plans name the index: its fields joined by commas."""
        return ",".join(self.fields)


def parse_index_entries(raw: Any) -> tuple[IndexSpec, ...]:
    """The `indexes` value of a collection table (a list of names or lists of names)."""
    if isinstance(raw, tuple) and all(isinstance(i, IndexSpec) for i in raw):
        return raw
    if not isinstance(raw, list | tuple):
        raise ValueError("indexes must be a list, like indexes = [\"status\", "
                         "[\"route\", \"eta\"]]")
    out: list[IndexSpec] = []
    for entry in raw:
        if isinstance(entry, IndexSpec):
            out.append(entry)
        elif isinstance(entry, str):
            out.append(IndexSpec(fields=(entry,)))
        elif isinstance(entry, Mapping) and set(entry) == {"fields"}:
            out.append(IndexSpec(fields=tuple(_names(entry["fields"]))))
        elif isinstance(entry, list | tuple):
            out.append(IndexSpec(fields=tuple(_names(entry))))
        else:
            raise ValueError(f"index {entry!r}: an index is a field name or a list of field "
                             "names, like \"status\" or [\"route\", \"eta\"]")
    return tuple(out)


def _names(raw: Any) -> list[str]:
    if not isinstance(raw, list | tuple) or not all(isinstance(n, str) for n in raw):
        raise ValueError(f"index {raw!r}: an index is a field name or a list of field "
                         "names, like \"status\" or [\"route\", \"eta\"]")
    return list(raw)


def check_indexes(indexes: Sequence[IndexSpec], fields: Mapping[str, FieldSpec]) -> None:
    """Refuse an index that cannot be kept: unknown or unorderable field, a field named
    twice, two set fields in one index, a duplicate index, too many."""
    if len(indexes) > MAX_INDEXES:
        raise ValueError(f"{len(indexes)} indexes: at most {MAX_INDEXES} per collection "
                         "(each one costs every write of the collection)")
    seen: set[tuple[str, ...]] = set()
    for index in indexes:
        where = f"index {list(index.fields)}"
        if not index.fields:
            raise ValueError(f"{where}: an index needs at least one field")
        if len(index.fields) > MAX_INDEX_FIELDS:
            raise ValueError(f"{where}: at most {MAX_INDEX_FIELDS} fields per index")
        if index.fields in seen:
            raise ValueError(f"{where} is declared twice")
        seen.add(index.fields)
        sets = 0
        for name in index.fields:
            if index.fields.count(name) > 1:
                raise ValueError(f"{where}: field {name!r} is named twice")
            if name == SCOPE_FIELD:
                continue
            spec = fields.get(name)
            if spec is None:
                known = ", ".join([*fields, SCOPE_FIELD])
                raise ValueError(f"{where}: no field {name!r} in this collection "
                                 f"(fields: {known})")
            if spec.type not in ORDERABLE_TYPES:
                raise ValueError(
                    f"{where}: field {name!r} is of type {spec.type!r}, whose values (objects "
                    "and arrays) have no order: index string, int, float, bool or set fields")
            if spec.type == "set":
                sets += 1
        if sets > 1:
            raise ValueError(f"{where}: at most one set field per index (each member of a "
                             "set is an entry of its own)")


__all__ = [
    "MAX_INDEXES",
    "MAX_INDEX_FIELDS",
    "SCOPE_FIELD",
    "IndexSpec",
    "check_indexes",
    "parse_index_entries",
]
