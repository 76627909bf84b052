"""Schema evolution: what changed between two schema versions, whether a device that is
still on the old version can keep syncing, and the migrations an operator declares for
the changes that are breaking (pure logic, no I/O; docs/SCHEMA_EVOLUTION.md).

A schema file may carry, besides `version` and `[collections.*]`, a `[[migrations]]`
array: the steps from the previous version to this one, applied in order.

    [[migrations]]
    op = "rename"            # field `from` is now called `to`
    collection = "tasks"
    from = "notes"
    to = "note"

    [[migrations]]
    op = "convert"           # field `field` changes type to its type in this version
    collection = "tasks"
    field = "eta"

    [[migrations]]
    op = "split"             # string `from` becomes the strings `to` (split at `sep`)
    collection = "people"
    from = "name"
    to = ["first", "last"]
    sep = " "

    [[migrations]]
    op = "merge"             # strings `from` become one string `to` (joined with `sep`)
    collection = "people"
    from = ["first", "last"]
    to = "name"
    sep = " "

    [[migrations]]
    op = "narrow"            # values outside the new bounds are clamped / cut
    collection = "inventory"
    field = "bin"

    [[migrations]]
    op = "remove"            # the field is dropped (old devices' values are ignored)
    collection = "tasks"
    field = "proof"

    [[migrations]]
    op = "drop_collection"   # the collection is gone; old devices' writes are refused
    collection = "legacy"

`diff(old, new)` lists every difference, each `compatible` or breaking.
`check_step(old, new, migrations)` applies the migrations to the old schema and diffs
the result against the new one: what is left must be compatible, else
`SchemaEvolutionError` names the first uncovered breaking difference and the
migration that would cover it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.collection import Catalog, CollectionSpec, FieldSpec, FieldType
from schemas.errors import SchemaEvolutionError
from schemas.wire import COLLECTION_PATTERN, FIELD_PATTERN

Kind = Literal[
    "new_collection", "new_field", "new_index", "dropped_index", "widened_type",
    "widened_bound", "description", "merge_policy", "retention",
    "removed_collection", "removed_field", "type_change", "narrowed_bound",
    "strategy_change", "scope_change",
]

COMPATIBLE_KINDS: frozenset[str] = frozenset({
    "new_collection", "new_field", "new_index", "dropped_index", "widened_type",
    "widened_bound", "description", "merge_policy", "retention",
})

# Type changes every old value survives unchanged (no migration needed).
_WIDENING: frozenset[tuple[str, str]] = frozenset({("int", "float")})
# Type changes a `convert` migration can carry both ways (see schemas.migrate).
CONVERTIBLE: frozenset[tuple[str, str]] = frozenset({
    ("int", "string"), ("float", "string"), ("bool", "string"),
    ("string", "int"), ("string", "float"), ("string", "bool"),
    ("float", "int"), ("int", "float"), ("bool", "int"), ("int", "bool"),
    ("int", "json"), ("float", "json"), ("string", "json"), ("bool", "json"),
    ("json", "string"), ("json", "int"), ("json", "float"), ("json", "bool"),
})
_VALUE_STRATEGIES = frozenset({"lww", "manual"})
_FIELD_RE = re.compile(FIELD_PATTERN)


@dataclass(frozen=True, slots=True)
class Difference:
    """One difference between two schema versions."""

    kind: str
    collection: str
    field: str | None
    detail: str

    @property
    def compatible(self) -> bool:
        return self.kind in COMPATIBLE_KINDS

    def describe(self) -> str:
        where = self.collection if self.field is None else f"{self.collection}.{self.field}"
        label = "compatible" if self.compatible else "BREAKING"
        return f"{label:10} {self.kind:18} {where}: {self.detail}"


# --- migration declarations ---------------------------------------------------------


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    collection: str = Field(pattern=COLLECTION_PATTERN)


class Rename(_Step):
    op: Literal["rename"] = "rename"
    src: str = Field(alias="from", pattern=FIELD_PATTERN)
    dst: str = Field(alias="to", pattern=FIELD_PATTERN)


class Convert(_Step):
    op: Literal["convert"] = "convert"
    field: str = Field(pattern=FIELD_PATTERN)


class Split(_Step):
    op: Literal["split"] = "split"
    src: str = Field(alias="from", pattern=FIELD_PATTERN)
    dst: tuple[str, ...] = Field(alias="to", min_length=2, max_length=16)
    sep: str = Field(default=" ", min_length=1, max_length=16)


class Merge(_Step):
    op: Literal["merge"] = "merge"
    src: tuple[str, ...] = Field(alias="from", min_length=2, max_length=16)
    dst: str = Field(alias="to", pattern=FIELD_PATTERN)
    sep: str = Field(default=" ", min_length=1, max_length=16)


class Narrow(_Step):
    op: Literal["narrow"] = "narrow"
    field: str = Field(pattern=FIELD_PATTERN)


class Remove(_Step):
    op: Literal["remove"] = "remove"
    field: str = Field(pattern=FIELD_PATTERN)


class DropCollection(_Step):
    op: Literal["drop_collection"] = "drop_collection"


Migration = Rename | Convert | Split | Merge | Narrow | Remove | DropCollection
_OPS: dict[str, type[BaseModel]] = {
    "rename": Rename, "convert": Convert, "split": Split, "merge": Merge,
    "narrow": Narrow, "remove": Remove, "drop_collection": DropCollection,
}


def parse_migrations(raw: Any, source: str = "<memory>") -> tuple[Migration, ...]:
    """Validate a decoded `[[migrations]]` array; errors name the file and the entry."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SchemaEvolutionError(
            f"{source}: 'migrations' must be an array of tables ([[migrations]])")
    out: list[Migration] = []
    for index, entry in enumerate(raw):
        where = f"{source}: migrations[{index}]"
        if not isinstance(entry, dict):
            raise SchemaEvolutionError(f"{where}: must be a table")
        op = entry.get("op")
        model = _OPS.get(op) if isinstance(op, str) else None
        if model is None:
            raise SchemaEvolutionError(
                f"{where}: 'op' must be one of {', '.join(sorted(_OPS))}")
        try:
            step: Migration = model.model_validate(entry)  # type: ignore[assignment]
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise SchemaEvolutionError(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}"
                                       ) from None
        if isinstance(step, Split | Merge):
            names = step.dst if isinstance(step, Split) else step.src
            for name in names:
                if not isinstance(name, str) or not _field_name_ok(name):
                    raise SchemaEvolutionError(f"{where}: {name!r} is not a valid field name")
            if len(set(names)) != len(names):
                raise SchemaEvolutionError(f"{where}: names the same field twice")
        out.append(step)
    return tuple(out)


def _field_name_ok(name: str) -> bool:
    return _FIELD_RE.fullmatch(name) is not None


def migration_to_dict(step: Migration) -> dict[str, Any]:
    """The TOML / JSON form of a migration (as declared)."""
    return step.model_dump(by_alias=True, mode="json")


# --- diff ---------------------------------------------------------------------------


def diff(old: Catalog, new: Catalog) -> list[Difference]:
    """Every difference from `old` to `new`, in a stable order (by collection, field)."""
    return diff_collections(old.collections, new.collections)


def diff_collections(old: dict[str, CollectionSpec],
                     new: dict[str, CollectionSpec]) -> list[Difference]:
    out: list[Difference] = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None:
            assert b is not None
            out.append(Difference("new_collection", name, None,
                                  f"{len(b.fields)} fields"))
        elif b is None:
            out.append(Difference("removed_collection", name, None,
                                  "devices on the old version still write it"))
        else:
            out.extend(_diff_collection(name, a, b))
    return out


def _diff_collection(name: str, a: CollectionSpec, b: CollectionSpec) -> list[Difference]:
    out: list[Difference] = []
    if (a.scope_field, a.scope) != (b.scope_field, b.scope):
        out.append(Difference("scope_change", name, None,
                              f"scope rule {_scope(a)} -> {_scope(b)}: records would move "
                              "between scopes; create a new collection instead"))
    if a.description != b.description:
        out.append(Difference("description", name, None, "description changed"))
    if a.retention != b.retention:
        # Local to each device (what it may forget), so never breaking.
        out.append(Difference("retention", name, None, "device retention changed"))
    old_ix = {ix.fields for ix in a.indexes}
    new_ix = {ix.fields for ix in b.indexes}
    for fields in sorted(new_ix - old_ix):
        out.append(Difference("new_index", name, None, f"index {list(fields)}"))
    for fields in sorted(old_ix - new_ix):
        out.append(Difference("dropped_index", name, None, f"index {list(fields)}"))
    for field in sorted(a.fields.keys() | b.fields.keys()):
        fa, fb = a.fields.get(field), b.fields.get(field)
        if fa is None:
            assert fb is not None
            out.append(Difference("new_field", name, field,
                                  f"optional {fb.type} ({fb.strategy})"))
        elif fb is None:
            out.append(Difference("removed_field", name, field,
                                  f"{fa.type} field removed"))
        else:
            out.extend(_diff_field(name, field, fa, fb))
    return out


def _scope(spec: CollectionSpec) -> str:
    return f"scope_field={spec.scope_field}" if spec.scope_field else f"scope={spec.scope}"


def _diff_field(coll: str, field: str, a: FieldSpec, b: FieldSpec) -> list[Difference]:
    out: list[Difference] = []
    if a.type != b.type:
        widened = (a.type, b.type) in _WIDENING or (
            b.type == "json" and a.strategy in _VALUE_STRATEGIES
            and b.strategy in _VALUE_STRATEGIES and a.type != "set")
        out.append(Difference("widened_type" if widened else "type_change", coll, field,
                              f"{a.type} -> {b.type}"))
    if a.strategy != b.strategy:
        policy = {a.strategy, b.strategy} == {"lww", "manual"}
        out.append(Difference("merge_policy" if policy else "strategy_change", coll, field,
                              f"merge {a.strategy} -> {b.strategy}"))
    for bound, lower in (("min", True), ("max", False)):
        old_v, new_v = getattr(a, bound), getattr(b, bound)
        if old_v == new_v:
            continue
        if new_v is None:
            wider = True
        elif old_v is None:
            wider = False
        else:
            wider = new_v < old_v if lower else new_v > old_v
        out.append(Difference("widened_bound" if wider else "narrowed_bound", coll, field,
                              f"{bound} {_show(old_v)} -> {_show(new_v)}"))
    if a.max_length != b.max_length:
        wider = b.max_length is None or (a.max_length is not None
                                         and b.max_length > a.max_length)
        out.append(Difference("widened_bound" if wider else "narrowed_bound", coll, field,
                              f"max_length {_show(a.max_length)} -> {_show(b.max_length)}"))
    if a.description != b.description:
        out.append(Difference("description", coll, field, "description changed"))
    return out


def _show(value: float | int | None) -> str:
    if value is None:
        return "none"
    return str(int(value)) if float(value).is_integer() else str(value)


# --- checking a step ----------------------------------------------------------------


def check_step(old: Catalog, new: Catalog, migrations: Sequence[Migration]) -> list[Difference]:
    """Validate publishing `new` after `old` with `migrations`; return the full diff.

    Raises `SchemaEvolutionError` when the version does not go up, when a migration
    does not fit the two schemas, or when a breaking difference is left uncovered.
    """
    if new.version <= old.version:
        raise SchemaEvolutionError(
            f"{new.source}: version {new.version} is not above the published version "
            f"{old.version}; bump 'version'")
    derived = apply_to_schema(old.collections, new.collections, migrations, new.source)
    for left in diff_collections(derived, new.collections):
        if not left.compatible:
            raise SchemaEvolutionError(
                f"{new.source}: breaking change without a migration: {left.describe()}; "
                f"{_hint(left)}")
    return diff(old, new)


def _hint(d: Difference) -> str:
    where = f'collection = "{d.collection}"'
    if d.kind == "removed_field":
        return (f'declare [[migrations]] op = "rename" (with from = "{d.field}") or '
                f'op = "remove", {where}, field = "{d.field}"')
    if d.kind == "type_change":
        return f'declare [[migrations]] op = "convert", {where}, field = "{d.field}"'
    if d.kind == "narrowed_bound":
        return f'declare [[migrations]] op = "narrow", {where}, field = "{d.field}"'
    if d.kind == "removed_collection":
        return f'declare [[migrations]] op = "drop_collection", {where}'
    return "this change cannot be migrated; add a new field or collection instead"


def apply_to_schema(old: dict[str, CollectionSpec], new: dict[str, CollectionSpec],
                    migrations: Iterable[Migration], source: str = "<memory>"
                    ) -> dict[str, CollectionSpec]:
    """The old collections with `migrations` applied (field specs taken from `new`)."""
    cols: dict[str, dict[str, FieldSpec]] = {n: dict(c.fields) for n, c in old.items()}
    for index, step in enumerate(migrations):
        where = f"{source}: migrations[{index}] ({step.op} in {step.collection!r})"
        fields = cols.get(step.collection)
        if fields is None:
            raise SchemaEvolutionError(
                f"{where}: collection {step.collection!r} is not in the previous version")
        if isinstance(step, DropCollection):
            if step.collection in new:
                raise SchemaEvolutionError(f"{where}: the collection is still in this version")
            del cols[step.collection]
            continue
        target = new.get(step.collection)
        if target is None:
            raise SchemaEvolutionError(
                f"{where}: the collection is not in this version; use op = \"drop_collection\"")
        _apply_step(step, fields, target.fields, where)
    out: dict[str, CollectionSpec] = {}
    for name, fields in cols.items():
        base = old[name]
        try:
            out[name] = base.model_copy(update={"fields": fields})
        except ValidationError as exc:  # pragma: no cover - model_copy does not validate
            raise SchemaEvolutionError(f"{source}: {name}: {exc}") from None
    return out


def _apply_step(step: Migration, fields: dict[str, FieldSpec], target: dict[str, FieldSpec],
                where: str) -> None:
    def need_old(name: str) -> FieldSpec:
        spec = fields.get(name)
        if spec is None:
            raise SchemaEvolutionError(f"{where}: field {name!r} is not in the previous version")
        return spec

    def need_new(name: str) -> FieldSpec:
        spec = target.get(name)
        if spec is None:
            raise SchemaEvolutionError(f"{where}: field {name!r} is not in this version")
        return spec

    def fresh(name: str) -> None:
        if name in fields:
            raise SchemaEvolutionError(
                f"{where}: field {name!r} already exists in the previous version")

    if isinstance(step, Rename):
        spec = need_old(step.src)
        fresh(step.dst)
        need_new(step.dst)
        del fields[step.src]
        fields[step.dst] = spec
    elif isinstance(step, Convert):
        spec, goal = need_old(step.field), need_new(step.field)
        if spec.strategy not in _VALUE_STRATEGIES or goal.strategy not in _VALUE_STRATEGIES:
            raise SchemaEvolutionError(
                f"{where}: only lww / manual fields can be converted "
                f"({spec.strategy} -> {goal.strategy})")
        if spec.type == goal.type or (spec.type, goal.type) not in CONVERTIBLE:
            raise SchemaEvolutionError(
                f"{where}: cannot convert {spec.type} -> {goal.type}; convertible: "
                + ", ".join(f"{a}->{b}" for a, b in sorted(CONVERTIBLE)))
        fields[step.field] = spec.model_copy(update={"type": goal.type, "merge": goal.merge,
                                                     "min": goal.min, "max": goal.max,
                                                     "max_length": goal.max_length})
    elif isinstance(step, Split | Merge):
        srcs = [step.src] if isinstance(step, Split) else list(step.src)
        dsts = list(step.dst) if isinstance(step, Split) else [step.dst]
        for name in srcs:
            _string_lww(need_old(name), name, where)
            del fields[name]
        for name in dsts:
            fresh(name)
            _string_lww(need_new(name), name, where)
            fields[name] = target[name]
    elif isinstance(step, Narrow):
        spec, goal = need_old(step.field), need_new(step.field)
        if spec.type != goal.type or spec.strategy != goal.strategy:
            raise SchemaEvolutionError(f"{where}: narrow keeps the type; use convert first")
        if spec.strategy == "counter":
            raise SchemaEvolutionError(
                f"{where}: a counter's bounds cannot be narrowed (the sum of increments "
                "from devices cannot be clamped consistently)")
        fields[step.field] = goal
    elif isinstance(step, Remove):
        need_old(step.field)
        if step.field in target:
            raise SchemaEvolutionError(f"{where}: field {step.field!r} is still in this version")
        del fields[step.field]


def _string_lww(spec: FieldSpec, name: str, where: str) -> None:
    if spec.type != "string" or spec.strategy not in _VALUE_STRATEGIES:
        raise SchemaEvolutionError(
            f"{where}: split / merge work on string lww fields; {name!r} is "
            f"{spec.type} ({spec.strategy})")


def field_type(catalog: Catalog, collection: str, field: str) -> FieldType | None:
    spec = catalog.collections.get(collection)
    fs = spec.fields.get(field) if spec else None
    return fs.type if fs else None


__all__ = [
    "COMPATIBLE_KINDS",
    "CONVERTIBLE",
    "Convert",
    "Difference",
    "DropCollection",
    "Merge",
    "Migration",
    "Narrow",
    "Remove",
    "Rename",
    "Split",
    "apply_to_schema",
    "check_step",
    "diff",
    "diff_collections",
    "migration_to_dict",
    "parse_migrations",
]
