"""Query planning: which index serves a query, and which byte ranges of it to read.

Pure: no I/O. `plan(query, spec, indexes)` turns every field's conditions into a set of
points (eq, in) or one interval (ranges, prefix) of encoded values (waystation.sortkeys),
picks an index, and returns the key ranges to scan plus the conditions checked on each
entry read (`Check`), all as bytes: an entry matches when its key lies in a range and
passes the checks, which is exactly the query's meaning because the encoding preserves
order and equality.

Which index: every filtered field and the order field must be fields of ONE index;
filters on a field that no index holds are refused (`IndexRequired`, naming the index
to add), never answered by scanning records. Of the indexes holding them, the one whose
leading fields are pinned by eq/in (then one range) narrows the scan most; the order
field must come no later than the first field not pinned. A set field in an index is
usable only when the query names one member of it (eq): each member is an entry, so
anything else could list a record twice.

Result order: by the order field (then the index's later fields, then the record key,
all in the same direction); without `order_by`, in the index's order. The cursor of a
page is the position of its last entry (`merge_key`), so the next page starts right
after it: a record that did not change between pages is never repeated or skipped.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from agent.query.errors import IndexNotReady, IndexRequired, QueryError
from agent.query.indexes import ID_BYTES, LIVE, IndexDef
from agent.query.model import FieldFilter, Query
from schemas.collection import CollectionSpec
from waystation import filters
from waystation import sortkeys as keys
from waystation.filters import Constraint, FilterError, Interval, Points

MAX_RANGES = 1024
"""Combinations of `in` values across fields (each is one range to read)."""


@dataclass(frozen=True, slots=True)
class Range:
    """Entries [lo, hi) of the index; `fixed` bytes are the index id and the pinned
    fields, the same for every entry in the range; the merge key of an entry is
    ``entry[strip:]``."""

    lo: bytes
    hi: bytes
    fixed: int
    strip: int


@dataclass(frozen=True, slots=True)
class Check:
    """A condition checked on each entry: the encoding of the index field `skip`
    components after the range's fixed part lies in one of `intervals`."""

    skip: int
    intervals: tuple[Interval, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    collection: str
    index: IndexDef | None
    """None: no filter and no order, read in record-key order (no index needed)."""
    ranges: tuple[Range, ...]
    checks: tuple[Check, ...]
    desc: bool
    include_deleted: bool
    fingerprint: bytes
    """Names the query and the index; a cursor carries it."""

    @property
    def index_name(self) -> str | None:
        return None if self.index is None else self.index.name

    def accepts(self, rng: Range, entry: bytes, value: bytes) -> bool:
        """Whether an entry read from `rng` passes the checks and the deleted filter."""
        if not self.include_deleted and value[:1] != LIVE:
            return False
        if not self.checks:
            return True
        pos = rng.fixed
        done = 0
        for check in self.checks:
            while done < check.skip:
                pos = keys.skip(entry, pos)
                done += 1
            tail = entry[pos:]
            if not any(iv.lo <= tail and (iv.hi is None or tail < iv.hi)
                       for iv in check.intervals):
                return False
        return True

    def matches(self, entry: bytes, value: bytes) -> bool:
        """Whether one index entry belongs to the result (the live-query test)."""
        for rng in self.ranges:
            if rng.lo <= entry < rng.hi:
                return self.accepts(rng, entry, value)
        return False


def plan(query: Query, spec: CollectionSpec, indexes: Sequence[IndexDef], *,
         for_count: bool = False) -> Plan:
    """The plan of `query` on a collection with these indexes (any state but drop).

    Raises QueryError (malformed), IndexRequired (no index serves it) or IndexNotReady
    (the only index that serves it is still being built)."""
    cons: dict[str, Constraint | None] = {}
    for name, flt in query.where.items():
        cons[name] = constraint(spec, name, flt)
    if query.order_by is not None:
        ftype = field_type(spec, query.order_by)
        if ftype == "set":
            raise QueryError(f"{spec.name}.{query.order_by} is a set field: a record has "
                             "several members, so it cannot be ordered by them")
    usable = [ix for ix in indexes if ix.state != "drop" and ix.collection == spec.name]
    if not cons and query.order_by is None:
        whole = [ix for ix in usable if ix.state == "ready" and not _set_fields(spec, ix)]
        if for_count and whole:
            ix = min(whole, key=lambda i: (len(i.fields), i.id))
            rng = Range(ix.prefix, keys.successor(ix.prefix), ID_BYTES, 0)
            return Plan(spec.name, ix, (rng,), (), False, query.include_deleted,
                        _fingerprint(query, ix))
        return Plan(spec.name, None, (), (), False, query.include_deleted,
                    _fingerprint(query, None))
    need = set(cons) | ({query.order_by} if query.order_by else set())
    best: tuple[tuple[int, ...], IndexDef, int] | None = None
    for ix in usable:
        if not need <= set(ix.fields):
            continue
        if any(not _is_single_point(cons.get(f)) for f in _set_fields(spec, ix)):
            continue
        pinned = 0
        while pinned < len(ix.fields) and isinstance(cons.get(ix.fields[pinned]), Points):
            pinned += 1
        if query.order_by is not None and ix.fields.index(query.order_by) > pinned:
            continue
        narrowed = pinned + (1 if pinned < len(ix.fields) and cons.get(ix.fields[pinned])
                             is not None else 0)
        score = (1 if ix.state == "ready" else 0, narrowed, -len(ix.fields), -ix.id)
        if best is None or score > best[0]:
            best = (score, ix, pinned)
    if best is None:
        fields = suggest_index(query, cons)
        raise IndexRequired(spec.name, fields, _missing_message(spec, query, fields, usable))
    _, ix, pinned = best
    if ix.state != "ready":
        raise IndexNotReady(
            f"index {spec.name}({ix.name}) is still being built ({ix.done} records so far): "
            "it completes when the agent opens the store with this schema (waystation "
            "agent run does); try again shortly")
    return _ranges(query, ix, cons, pinned)


def _ranges(query: Query, ix: IndexDef, cons: dict[str, Constraint | None],
            pinned: int) -> Plan:
    points: list[tuple[bytes, ...]] = []
    for name in ix.fields[:pinned]:
        c = cons[name]
        assert isinstance(c, Points)
        points.append(c.values)
    combos = 1
    for values in points:
        combos *= len(values)
    if combos > MAX_RANGES:
        raise QueryError(f"the in-lists of this query combine into {combos} lookups; at "
                         f"most {MAX_RANGES}: narrow them")
    rest = cons.get(ix.fields[pinned]) if pinned < len(ix.fields) else None
    order_at = ix.fields.index(query.order_by) if query.order_by is not None else None
    ranges: list[Range] = []
    prefix = ix.prefix
    for combo in itertools.product(*points):
        fixed = prefix + b"".join(combo)
        strip = 0 if order_at is None else len(prefix) + sum(len(v) for v in combo[:order_at])
        if isinstance(rest, Interval):
            lo = fixed + rest.lo
            hi = fixed + rest.hi if rest.hi is not None else keys.successor(fixed)
        else:
            lo, hi = fixed, keys.successor(fixed)
        if lo < hi:
            ranges.append(Range(lo, hi, len(fixed), strip))
    checks: list[Check] = []
    for pos in range(pinned + 1, len(ix.fields)):
        c = cons.get(ix.fields[pos])
        if c is None:
            continue
        intervals = (tuple(Interval(v, keys.successor(v)) for v in c.values)
                     if isinstance(c, Points) else (c,))
        checks.append(Check(pos - pinned, intervals))
    return Plan(query.collection, ix, tuple(ranges), tuple(checks), query.desc,
                query.include_deleted, _fingerprint(query, ix))


# ----------------------------------------------------------------- conditions


def field_type(spec: CollectionSpec, name: str) -> str:
    """The type of a field a query names (`$scope`: string); QueryError if unknown."""
    try:
        return filters.field_type(spec, name)
    except FilterError as exc:
        raise QueryError(str(exc), exc.code) from None


def constraint(spec: CollectionSpec, name: str, flt: FieldFilter) -> Constraint | None:
    """The encoded form of the conditions on one field (`waystation.filters`, which the
    server's fetch by query evaluates too); QueryError when malformed."""
    try:
        return filters.constraint(spec, name, flt)
    except FilterError as exc:
        raise QueryError(str(exc), exc.code) from None


def _is_single_point(c: Constraint | None) -> bool:
    return isinstance(c, Points) and len(c.values) <= 1


def _set_fields(spec: CollectionSpec, ix: IndexDef) -> list[str]:
    out = []
    for name in ix.fields:
        fspec = spec.fields.get(name)
        if fspec is not None and fspec.type == "set":
            out.append(name)
    return out


# -------------------------------------------------------------- suggestions


def suggest_index(query: Query, cons: dict[str, Constraint | None]) -> tuple[str, ...]:
    """The index that would serve `query`: pinned (eq / in) fields, then the order
    field, then the range fields."""
    pinned = [n for n in query.where if isinstance(cons.get(n), Points)]
    ranged = [n for n in query.where if n not in pinned]
    fields = list(pinned)
    if query.order_by is not None and query.order_by not in fields:
        fields.append(query.order_by)
    fields += [n for n in ranged if n not in fields]
    return tuple(fields)


BUILT_AT_OPEN = " (the agent builds it when it next opens the store)"
"""The end of an `index_required` message for a device that runs its schema file."""


def _missing_message(spec: CollectionSpec, query: Query, fields: tuple[str, ...],
                     usable: Sequence[IndexDef]) -> str:
    what = []
    if query.where:
        what.append("filters on " + ", ".join(query.where))
    if query.order_by is not None:
        what.append(f"order by {query.order_by}")
    have = "; it has " + ", ".join(f"[{ix.name}]" for ix in usable) if usable else (
        "; it has none")
    entry = orjson.dumps(list(fields)).decode().replace(",", ", ")
    return (f"no index of {spec.name} serves this query ({' and '.join(what)}){have}: add "
            f"{entry} to indexes = [...] under [collections.{spec.name}] in the collection "
            "schema" + BUILT_AT_OPEN)


def _fingerprint(query: Query, ix: IndexDef | None) -> bytes:
    doc = query.to_json_dict()
    doc.pop("after")
    doc.pop("limit")
    doc["ix"] = None if ix is None else ix.id
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).digest()[:8]


__all__ = [
    "MAX_RANGES",
    "Check",
    "Constraint",
    "Interval",
    "Plan",
    "Points",
    "Range",
    "constraint",
    "field_type",
    "plan",
    "suggest_index",
]
