"""The planner, pure: for random records and random queries, an entry is in the plan's
ranges and passes its checks exactly when the record matches the query (by the
brute-force reference), and merge keys order the matches by the order field."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.query import IndexNotReady, IndexRequired, QueryError
from agent.query.indexes import IndexDef, entries
from agent.query.model import Query
from agent.query.planner import plan
from agent.view import ViewState
from schemas.collection import CollectionSpec, parse_catalog
from tests.agent.query import reference

SPEC: CollectionSpec = parse_catalog({"version": 1, "collections": {"tasks": {
    "scope_field": "route",
    "fields": {"route": {"type": "string"}, "status": {"type": "string"},
               "eta": {"type": "float"}, "done": {"type": "bool"},
               "labels": {"type": "set"}, "proof": {"type": "json"}}}}}).collections["tasks"]
INDEXES = [IndexDef(i + 1, "tasks", fields, "ready") for i, fields in enumerate([
    ("status", "eta"), ("route", "eta"), ("labels", "eta"), ("$scope", "status", "done"),
    ("done", "status", "eta"), ("eta",)])]

STATUS = st.sampled_from([None, "", "a", "ab", "b", "a\x00", "é"])
ETA = st.one_of(st.none(), st.sampled_from([-1, 0, 0.5, 1, 1.0, 2, 2**53 + 1]),
                st.floats(-3, 3, allow_nan=False))
DONE = st.one_of(st.none(), st.booleans())
SCOPES = st.sampled_from(["r1", "r2"])


@st.composite
def views(draw: Any) -> list[ViewState]:
    out = []
    for i in range(draw(st.integers(0, 12))):
        fields: dict[str, Any] = {}
        for name, values in (("status", STATUS), ("eta", ETA), ("done", DONE)):
            if draw(st.booleans()):
                fields[name] = draw(values)
        if draw(st.booleans()):
            fields["labels"] = sorted(draw(st.sets(st.sampled_from("xyz"), max_size=3)))
        scope = draw(SCOPES)
        fields["route"] = scope
        out.append(ViewState("tasks", f"k{i}", scope, fields, x=draw(st.booleans())))
    return out


def _ops(values: st.SearchStrategy[Any], *, prefix: bool = False) -> st.SearchStrategy[Any]:
    bounds = values.filter(lambda v: v is not None)
    options = [values, st.lists(values, min_size=1, max_size=3).map(lambda v: {"in": v}),
               st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]), bounds,
                               min_size=1, max_size=2),
               st.tuples(values, st.dictionaries(st.sampled_from(["gt", "lte"]), bounds,
                                                 min_size=1)).map(
                   lambda t: {"in": [t[0]], **t[1]})]
    if prefix:
        options.append(st.sampled_from(["", "a", "a\x00", "b"]).map(lambda p: {"prefix": p}))
    return st.one_of(*options)


@st.composite
def queries(draw: Any) -> dict[str, Any]:
    template = draw(st.sampled_from(["status", "route", "labels", "scope", "done", "eta"]))
    where: dict[str, Any] = {}
    order = None
    if template == "status":
        where["status"] = draw(_ops(STATUS, prefix=True))
        if draw(st.booleans()):
            where["eta"] = draw(_ops(ETA))
        order = draw(st.sampled_from([None, "eta", "status"]))
    elif template == "route":
        where["route"] = draw(_ops(SCOPES, prefix=True))
        order = draw(st.sampled_from([None, "eta"]))
    elif template == "labels":
        where["labels"] = draw(st.sampled_from("xyzw"))
        order = draw(st.sampled_from([None, "eta"]))
    elif template == "scope":
        where["$scope"] = draw(SCOPES)
        if draw(st.booleans()):
            where["status"] = draw(STATUS)
        if draw(st.booleans()):
            where["done"] = draw(_ops(DONE))  # a check on a later field of the index
    elif template == "done":
        where["done"] = draw(_ops(DONE))
        if draw(st.booleans()):
            where["eta"] = draw(_ops(ETA))  # skips status: checked on each entry
    else:
        if draw(st.booleans()):
            where["eta"] = draw(_ops(ETA))
        order = "eta"
    query = {"collection": "tasks", "where": where, "order_by": order,
             "include_deleted": draw(st.booleans())}
    if order is not None:
        query["desc"] = draw(st.booleans())
    return query


def _normal(where: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: (ops if isinstance(ops, dict) else {"eq": ops}) for n, ops in where.items()}


@settings(max_examples=400, deadline=None)
@given(records=views(), doc=queries())
def test_plan_selects_exactly_the_matching_records_in_order(records: list[ViewState],
                                                            doc: dict[str, Any]) -> None:
    """Entries in the plan's ranges that pass its checks are those of matching records
    (each record once), and their merge keys order them by the order field."""
    query = Query.model_validate(doc)
    try:
        p = plan(query, SPEC, INDEXES)
    except IndexRequired:
        # Right only when a range or prefix comes before the order field.
        ranged = [n for n, ops in doc["where"].items() if n != query.order_by
                  and isinstance(ops, dict) and set(ops) - {"eq", "in"}]
        assert query.order_by is not None and ranged, doc
        return
    except QueryError as exc:  # a bound of another kind than the field: refused, fine
        assert "can never match" in str(exc) or "one kind" in str(exc), exc
        return
    truth = {v.k for v in reference.select(records, _normal(doc["where"]),
                                           doc["include_deleted"])}
    hits: list[tuple[bytes, ViewState]] = []
    for view in records:
        assert p.index is not None
        for key, value in entries(p.index, view).items():
            for rng in p.ranges:
                if rng.lo <= key < rng.hi and p.accepts(rng, key, value):
                    hits.append((key[rng.strip:], view))
    assert sorted(v.k for _, v in hits) == sorted(truth), (doc, p)
    if query.order_by is not None:
        hits.sort(key=lambda h: h[0], reverse=query.desc)
        values = [reference.value(v, query.order_by) for _, v in hits]
        sign = -1 if query.desc else 1
        ordered = sorted(values, key=functools.cmp_to_key(reference.compare),
                         reverse=query.desc)
        assert [reference.compare(a, b) for a, b in zip(values, ordered, strict=True)] == [
            0] * len(values), (sign, values)


def test_choice_of_index_and_refusals() -> None:
    """The narrowest ready index is chosen; missing ones are named; building ones said."""
    p = plan(Query(collection="tasks", where={"status": {"eq": "a"}}, order_by="eta"),
             SPEC, INDEXES)
    assert p.index is not None and p.index.fields == ("status", "eta")
    p = plan(Query(collection="tasks", where={"done": {"eq": True}, "status": {"eq": "a"}}),
             SPEC, INDEXES)
    assert p.index is not None and p.index.fields == ("done", "status", "eta")
    with pytest.raises(IndexRequired) as err:
        plan(Query(collection="tasks", where={"status": {"eq": "a"}}, order_by="route"),
             SPEC, INDEXES)
    assert err.value.fields == ("status", "route")
    p = plan(Query(collection="tasks", where={"status": {"eq": "a"}}, order_by="done"),
             SPEC, INDEXES)  # done first, status checked on each entry
    assert p.index is not None and p.index.fields == ("done", "status", "eta")
    assert len(p.checks) == 1
    building = [IndexDef(9, "tasks", ("status", "eta"), "build", "k5", 41)]
    with pytest.raises(IndexNotReady, match="still being built \\(41 records so far\\)"):
        plan(Query(collection="tasks", where={"status": {"eq": "a"}}), SPEC, building)
    with pytest.raises(IndexRequired):
        plan(Query(collection="tasks", where={"status": {"eq": "a"}}), SPEC,
             [IndexDef(9, "tasks", ("status", "eta"), "drop")])
    where: dict[str, Any] = {"done": {"in": [True, False, None]},
                             "status": {"in": [str(i) for i in range(11)]},
                             "eta": {"in": list(range(31))}}
    assert len(plan(Query.model_validate({"collection": "tasks", "where": where}), SPEC,
                    INDEXES).ranges) == 3 * 11 * 31
    where["eta"] = {"in": list(range(32))}
    with pytest.raises(QueryError, match="combine into 1056 lookups; at most 1024"):
        plan(Query.model_validate({"collection": "tasks", "where": where}), SPEC, INDEXES)
