"""Collection schemas: the operator's TOML file naming collections, fields, types,
merge strategies and how each record's scope is found (PROTOCOL.md §5).

    version = 3

    [collections.inventory]
    scope_field = "depot"             # the record's scope is this field's value
    indexes = ["stock", ["tags", "stock"]]   # kept ordered on the device (schemas.indexes)
    retention = { after = "30d" }     # devices may evict synced records (schemas.retention)
    [collections.inventory.fields]
    depot = { type = "string" }
    stock = { type = "int", merge = "counter", min = 0 }
    tags  = { type = "set" }

`load_catalog(path)` reads and validates a file; every error names the file, the
collection and the field.
"""

from __future__ import annotations

import functools
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas import zdict_schema
from schemas.errors import CollectionSchemaError
from schemas.indexes import IndexSpec, check_indexes, parse_index_entries
from schemas.retention import RetentionRule
from schemas.wire import COLLECTION_PATTERN, FIELD_PATTERN, ID_PATTERN, MAX_SAFE_INT, json_depth

FieldType = Literal["string", "int", "float", "bool", "json", "set"]
Strategy = Literal["lww", "manual", "counter", "set"]

_COLLECTION_RE = re.compile(COLLECTION_PATTERN)
_FIELD_RE = re.compile(FIELD_PATTERN)
_ID_RE = re.compile(ID_PATTERN)


class FieldSpec(BaseModel):
    """One field of a collection: its type and how concurrent writes merge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: FieldType
    merge: Strategy | None = None
    min: float | None = None
    max: float | None = None
    max_length: int | None = Field(default=None, ge=1)
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> FieldSpec:
        merge = self.strategy
        if self.type == "set" and merge != "set":
            raise ValueError("a field of type 'set' must use merge = 'set'")
        if merge == "set" and self.type != "set":
            raise ValueError("merge = 'set' needs type = 'set'")
        if merge == "counter" and self.type not in ("int", "float"):
            raise ValueError("merge = 'counter' needs type = 'int' or 'float'")
        if (self.min is not None or self.max is not None) and self.type not in ("int", "float"):
            raise ValueError("min / max apply only to int and float fields")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.max_length is not None and self.type not in ("string", "set"):
            raise ValueError("max_length applies only to string and set fields")
        return self

    @property
    def strategy(self) -> Strategy:
        if self.merge is not None:
            return self.merge
        return "set" if self.type == "set" else "lww"

    def type_error(self, value: Any) -> str | None:
        """Why `value` cannot be stored in this field (lww/manual value), or None."""
        if value is None:
            return None
        kind = self.type
        if kind == "string":
            if not isinstance(value, str):
                return f"expected a string, got {_json_type(value)}"
            if self.max_length is not None and len(value) > self.max_length:
                return f"string longer than {self.max_length} characters"
            return None
        if kind == "bool":
            return None if isinstance(value, bool) else f"expected a bool, got {_json_type(value)}"
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return f"expected an integer, got {_json_type(value)}"
            if abs(value) > MAX_SAFE_INT:
                return "integer outside the 53-bit range"
            return self._range_error(value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"expected a number, got {_json_type(value)}"
            if isinstance(value, float) and not math.isfinite(value):
                return "number is not finite"
            return self._range_error(value)
        if kind == "json":
            return None
        return "a set field takes members through add/remove, not a value"

    def member_error(self, member: Any) -> str | None:
        """Why `member` cannot be a member of this set field, or None."""
        if not isinstance(member, str):
            return f"set members must be strings, got {_json_type(member)}"
        if self.max_length is not None and len(member) > self.max_length:
            return f"member longer than {self.max_length} characters"
        return None

    def increment_error(self, inc: Any) -> str | None:
        if isinstance(inc, bool) or not isinstance(inc, int | float):
            return f"expected a number, got {_json_type(inc)}"
        if self.type == "int" and not isinstance(inc, int):
            return "an int counter takes integer increments"
        return None

    def _range_error(self, value: float) -> str | None:
        if self.min is not None and value < self.min:
            return f"{value} is below the minimum {_num(self.min)}"
        if self.max is not None and value > self.max:
            return f"{value} is above the maximum {_num(self.max)}"
        return None


FieldEntry: TypeAlias = tuple[Strategy, FieldSpec, int | None]
"""One row of `CollectionSpec.field_table`."""
ANY_JSON = -1
"""Quick-fit limit of a json field: every JSON value fits."""
ANY_INT = -2
"""Quick-fit limit of an int or float field without min / max: any 53-bit int fits."""


class CollectionSpec(BaseModel):
    """One collection: its fields and how a record's scope is found."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    scope_field: str | None = None
    scope: str | None = None
    description: str = ""
    fields: dict[str, FieldSpec]
    indexes: tuple[IndexSpec, ...] = ()
    """Fields the device keeps ordered for queries (`schemas.indexes`); local only."""
    retention: RetentionRule | None = None
    """When devices may evict synced records (`schemas.retention`); local only."""

    @field_validator("indexes", mode="before")
    @classmethod
    def _index_entries(cls, raw: Any) -> tuple[IndexSpec, ...]:
        return parse_index_entries(raw)

    @model_validator(mode="after")
    def _indexes_orderable(self) -> CollectionSpec:
        check_indexes(self.indexes, self.fields)
        return self

    @model_validator(mode="after")
    def _retention_fields(self) -> CollectionSpec:
        if self.retention is not None:
            for name in self.retention.when:
                if name not in self.fields:
                    raise ValueError(f"retention.when names {name!r}, not one of the fields")
        return self

    @functools.cached_property
    def field_table(self) -> dict[str, FieldEntry]:
        """field -> (strategy, FieldSpec, quick-fit limit), computed once per spec: the
        hot paths (merge, the agent's put) look each field up once. The limit says which
        values certainly fit the field without asking `FieldSpec.type_error`: for a
        string field, strings of at most that many characters; `ANY_JSON` for a json
        field; `ANY_INT` for an int or float field without min / max (any 53-bit int);
        None: ask."""
        table: dict[str, FieldEntry] = {}
        for name, fs in self.fields.items():
            limit: int | None = None
            if fs.type == "string":
                limit = fs.max_length if fs.max_length is not None else MAX_SAFE_INT
            elif fs.type == "json":
                limit = ANY_JSON
            elif fs.type in ("int", "float") and fs.min is None and fs.max is None:
                limit = ANY_INT
            table[name] = (fs.strategy, fs, limit)
        return table

    @model_validator(mode="after")
    def _scope_rule(self) -> CollectionSpec:
        if (self.scope_field is None) == (self.scope is None):
            raise ValueError("set exactly one of scope_field (a field holding the scope) "
                             "or scope (one fixed scope for every record)")
        if self.scope is not None and not _ID_RE.fullmatch(self.scope):
            raise ValueError(f"scope {self.scope!r} is not a valid scope id ({ID_PATTERN})")
        if self.scope_field is not None:
            spec = self.fields.get(self.scope_field)
            if spec is None:
                raise ValueError(f"scope_field {self.scope_field!r} is not one of the fields")
            if spec.type != "string" or spec.strategy != "lww":
                raise ValueError(f"scope_field {self.scope_field!r} must be a string lww field")
        return self

    def scope_of(self, fields: dict[str, Any]) -> str | None:
        """The scope a new record with these field values belongs to (None if not set)."""
        if self.scope is not None:
            return self.scope
        assert self.scope_field is not None
        value = fields.get(self.scope_field)
        return value if isinstance(value, str) else None


class Catalog(BaseModel):
    """Every collection the fleet syncs, under one schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1, le=MAX_SAFE_INT)
    collections: dict[str, CollectionSpec]
    source: str = "<memory>"

    def model_post_init(self, context: Any, /) -> None:
        # Whatever schema version this process holds, it can read streams compressed
        # with that version's dictionary (capability zd2, schemas.zdict_schema).
        zdict_schema.register(self)

    def collection(self, name: str) -> CollectionSpec | None:
        return self.collections.get(name)


def parse_catalog(data: dict[str, Any], source: str = "<memory>") -> Catalog:
    """Validate a decoded schema document; errors name `source`, collection and field."""
    if not isinstance(data, dict):
        raise CollectionSchemaError(f"{source}: the schema must be a TOML table")
    # `migrations` (schemas.evolution) describes how this version follows the previous
    # one; it is read by the schema history, not part of the catalog.
    unknown = set(data) - {"version", "collections", "migrations"}
    if unknown:
        raise CollectionSchemaError(
            f"{source}: unknown top-level key {sorted(unknown)[0]!r}; "
            "expected only 'version', [collections.*] and [[migrations]]")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CollectionSchemaError(
            f"{source}: 'version' must be an integer >= 1 (bump it whenever the schema changes)")
    raw_collections = data.get("collections")
    if not isinstance(raw_collections, dict) or not raw_collections:
        raise CollectionSchemaError(
            f"{source}: no collections defined; add a [collections.NAME] table")
    collections: dict[str, CollectionSpec] = {}
    for name, body in raw_collections.items():
        where = f"{source}: collection {name!r}"
        if not _COLLECTION_RE.fullmatch(name):
            raise CollectionSchemaError(f"{where}: name must match {COLLECTION_PATTERN}")
        if not isinstance(body, dict):
            raise CollectionSchemaError(f"{where}: must be a table")
        raw_fields = body.get("fields")
        if not isinstance(raw_fields, dict) or not raw_fields:
            raise CollectionSchemaError(
                f"{where}: no fields; add [collections.{name}.fields]")
        fields: dict[str, FieldSpec] = {}
        for fname, fbody in raw_fields.items():
            fwhere = f"{where}, field {fname!r}"
            if not _FIELD_RE.fullmatch(fname):
                raise CollectionSchemaError(f"{fwhere}: name must match {FIELD_PATTERN}")
            if not isinstance(fbody, dict):
                raise CollectionSchemaError(
                    f"{fwhere}: must be a table like {{ type = \"string\" }}")
            try:
                fields[fname] = FieldSpec.model_validate(fbody)
            except ValidationError as exc:
                raise CollectionSchemaError(f"{fwhere}: {_first_error(exc)}") from None
        rest = {k: v for k, v in body.items() if k != "fields"}
        try:
            collections[name] = CollectionSpec.model_validate(
                {**rest, "name": name, "fields": fields})
        except ValidationError as exc:
            raise CollectionSchemaError(f"{where}: {_first_error(exc)}") from None
    return Catalog(version=version, collections=collections, source=source)


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a collection schema file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CollectionSchemaError(
            f"{path}: cannot read the collection schema ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CollectionSchemaError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise CollectionSchemaError(f"{path}: not valid TOML ({exc})") from None
    return parse_catalog(data, str(path))


def example_catalog_path() -> Path:
    """The example fleet schema shipped with the package (used by the demo and tests)."""
    return Path(__file__).parent / "examples" / "fleet.toml"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    if err["type"] == "literal_error":
        return f"{loc}: {msg}"
    return f"{loc}: {msg}" if loc else msg


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


__all__ = [
    "Catalog",
    "CollectionSpec",
    "FieldSpec",
    "FieldType",
    "Strategy",
    "example_catalog_path",
    "json_depth",
    "load_catalog",
    "parse_catalog",
]
