"""Record filters, the one meaning both sides give them: the `where` of a local query
(`agent.query`, docs/QUERIES.md) and of a fetch by query (`fetchq`, PROTOCOL.md §7.14.1).

Pure: no I/O. A filter maps a field (or ``$scope``) to its conditions -- ``eq``, ``in``,
``gt``/``gte``/``lt``/``lte``, ``prefix`` -- all combined with AND. `constraint` turns
one field's conditions into a set of points or one interval of sortable encodings
(`waystation.sortkeys`); the agent's planner reads index ranges with them, and
`CompiledFilter.matches` tests one record's values against them. Because both use the
same encodings and bounds, a record matches on the server exactly when the device's
index would list it (a set field matches when one of its members does; a missing field
is null).

Bounded by construction: one level of conditions (no nesting), at most `MAX_CONDITIONS`
fields, `MAX_IN_VALUES` values per ``in``, `MAX_VALUE_CHARS` per string.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_serializer,
    model_validator,
)

from schemas.indexes import SCOPE_FIELD
from waystation import sortkeys as keys

if TYPE_CHECKING:  # schemas.collection imports the wire models, which import this
    from schemas.collection import CollectionSpec

MAX_IN_VALUES = 256
MAX_CONDITIONS = 16
MAX_VALUE_CHARS = 4096
FILTER_FIELD_PATTERN = r"^(\$scope|[A-Za-z_][A-Za-z0-9_]{0,63})$"
RANGE_OPS = ("gt", "gte", "lt", "lte")

StrictFiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[StrictStr, Field(max_length=MAX_VALUE_CHARS)]
Scalar = StrictBool | StrictInt | StrictFiniteFloat | Text | None


class FilterError(ValueError):
    """A filter that cannot be evaluated on this collection; the message says what to
    change, `code` is the machine-readable reason (bad_query, unknown_field)."""

    def __init__(self, message: str, code: str = "bad_query") -> None:
        super().__init__(message)
        self.code = code


class FieldFilter(BaseModel):
    """The conditions on one field (all must hold)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              json_schema_extra={"minProperties": 1})

    eq: Scalar = None
    """Equal to (null: the field is null or missing). Only counts when given."""
    in_: tuple[Scalar, ...] | None = Field(default=None, alias="in", min_length=1,
                                           max_length=MAX_IN_VALUES)
    gt: Scalar = None
    gte: Scalar = None
    lt: Scalar = None
    lte: Scalar = None
    prefix: Text | None = None

    @model_validator(mode="after")
    def _some_condition(self) -> FieldFilter:
        given = self.model_fields_set
        if not given:
            raise ValueError("a field filter needs an operator: eq, in, gt, gte, lt, lte "
                             "or prefix")
        for op in RANGE_OPS:
            if op in given and getattr(self, op) is None:
                raise ValueError(f"{op}: null has no order; use eq: null for a missing field")
        if "prefix" in given and self.prefix is None:
            raise ValueError("prefix must be a string")
        if "in" in given and self.in_ is None:
            raise ValueError("in must be a list of values")
        return self

    @property
    def has_eq(self) -> bool:
        return "eq" in self.model_fields_set

    @model_serializer(mode="plain")
    def ops(self) -> dict[str, Any]:
        """The operators given, as in JSON (also how it serializes: an `eq: null` that
        was given is kept even where defaults are left out, as on the wire)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.model_fields_set:
                value = getattr(self, name)
                out["in" if name == "in_" else name] = (list(value) if isinstance(value, tuple)
                                                        else value)
        return out


def shorthand(raw: Any) -> Any:
    """A bare value means equality: {"status": "out"} is {"status": {"eq": "out"}}."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        return raw
    out: dict[Any, Any] = {}
    for name, cond in raw.items():
        if isinstance(cond, list | tuple):
            raise ValueError(f"{name}: a list is not a value; use {{\"in\": [...]}} to "
                             "match any of several values")
        out[name] = cond if isinstance(cond, Mapping | FieldFilter) else {"eq": cond}
    return out


# --- encoded constraints ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Points:
    """The field must equal one of these encoded values (sorted, distinct)."""

    values: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Interval:
    """The field's encoding (with what follows it) lies in [lo, hi); hi None: no end."""

    lo: bytes
    hi: bytes | None


Constraint = Points | Interval


def field_type(spec: CollectionSpec, name: str) -> str:
    """The type of a field a filter names (`$scope`: string); FilterError if unknown."""
    if name == SCOPE_FIELD:
        return "string"
    fspec = spec.fields.get(name)
    if fspec is None:
        known = ", ".join([*spec.fields, SCOPE_FIELD])
        raise FilterError(f"{spec.name} has no field {name!r} (fields: {known})",
                          "unknown_field")
    return fspec.type


_KIND_OF_TYPE = {"string": "string", "int": "number", "float": "number", "bool": "bool",
                 "set": "string", "json": "other"}


def constraint(spec: CollectionSpec, name: str, flt: FieldFilter) -> Constraint:
    """The encoded form of the conditions on one field (`Points(())`: nothing matches)."""
    ftype = field_type(spec, name)
    where = f"{spec.name}.{name}"
    if ftype == "json":
        raise FilterError(f"{where} is a json field: its values have no order and cannot be "
                          "indexed or filtered")
    given = flt.model_fields_set
    if ftype == "set" and given != {"eq"}:
        # the long form, which a local query and a wire fetchq (§7.14.1) both take:
        # the wire has no shorthand `{"labels": "member"}`
        raise FilterError(f"{where} is a set field: filter it by one member, like "
                          f"{{\"{name}\": {{\"eq\": \"member\"}}}} (records holding "
                          "that member)")
    expected = _KIND_OF_TYPE[ftype]

    def enc(op: str, value: object) -> bytes:
        kind = keys.kind(value)
        if kind != expected and not (kind == "null" and ftype != "set"):
            raise FilterError(f"{where} is a {ftype} field: {op} {value!r} is "
                              f"{'null' if kind == 'null' else 'a ' + kind} and can never match")
        try:
            return keys.encode(value)
        except UnicodeEncodeError:
            raise FilterError(f"{where}: {op} value is not valid Unicode text") from None

    point_set: set[bytes] | None = None
    if flt.has_eq:
        point_set = {enc("eq", flt.eq)}
    if flt.in_ is not None:
        found = {enc("in", v) for v in flt.in_}
        point_set = found if point_set is None else point_set & found
    lo: bytes | None = None
    hi: bytes | None = None
    kinds = set()
    for op in RANGE_OPS:
        if op not in given:
            continue
        value = getattr(flt, op)
        bound = enc(op, value)
        kinds.add(keys.kind(value))
        if op in ("gt", "gte"):
            b = keys.successor(bound) if op == "gt" else bound
            lo = b if lo is None else max(lo, b)
        else:
            b = bound if op == "lt" else keys.successor(bound)
            hi = b if hi is None else min(hi, b)
    if flt.prefix is not None:
        if expected != "string":
            raise FilterError(f"{where} is a {ftype} field: prefix applies to strings")
        try:
            start = keys.encode_prefix(flt.prefix)
        except UnicodeEncodeError:
            raise FilterError(f"{where}: prefix is not valid Unicode text") from None
        kinds.add("string")
        lo = start if lo is None else max(lo, start)
        end = keys.successor(start)
        hi = end if hi is None else min(hi, end)
    if len(kinds) > 1:
        raise FilterError(f"{where}: the bounds of one range must be of one kind "
                          f"(got {', '.join(sorted(kinds))})")
    if kinds:
        first, after = keys.KIND_BOUNDS[kinds.pop()]
        lo = first if lo is None else max(lo, first)
        hi = after if hi is None else min(hi, after)
    if point_set is not None:
        values = tuple(sorted(v for v in point_set
                              if (lo is None or lo <= v) and (hi is None or v < hi)))
        return Points(values)
    if lo is not None and hi is not None and lo >= hi:
        return Points(())
    return Interval(lo or b"", hi)


def _holds(con: Constraint, encoded: bytes) -> bool:
    if isinstance(con, Points):
        return encoded in con.values
    return con.lo <= encoded and (con.hi is None or encoded < con.hi)


@dataclass(frozen=True, slots=True)
class CompiledFilter:
    """A filter checked against one collection's schema, ready to test records."""

    collection: str
    conditions: tuple[tuple[str, Constraint], ...]

    def matches(self, scope: str, values: Mapping[str, Any]) -> bool:
        """Whether a live record with this scope and these visible field values (a set
        as the list of its members; a missing field is null) passes every condition."""
        for name, con in self.conditions:
            value = scope if name == SCOPE_FIELD else values.get(name)
            if not any(_holds(con, keys.encode(v)) for v in keys.members(value)):
                return False
        return True


def compile_filter(spec: CollectionSpec, where: Mapping[str, FieldFilter]) -> CompiledFilter:
    """`where` checked against `spec` (FilterError names the first thing wrong)."""
    if len(where) > MAX_CONDITIONS:
        raise FilterError(f"a filter names at most {MAX_CONDITIONS} fields, got {len(where)}")
    return CompiledFilter(spec.name, tuple((name, constraint(spec, name, flt))
                                           for name, flt in where.items()))


__all__ = [
    "FILTER_FIELD_PATTERN",
    "MAX_CONDITIONS",
    "MAX_IN_VALUES",
    "MAX_VALUE_CHARS",
    "RANGE_OPS",
    "CompiledFilter",
    "Constraint",
    "FieldFilter",
    "FilterError",
    "Interval",
    "Points",
    "Scalar",
    "compile_filter",
    "constraint",
    "field_type",
    "shorthand",
]
