"""Carrying values across declared migrations both ways (schemas.migrate)."""

from __future__ import annotations

import itertools
import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.collection import Catalog, parse_catalog
from schemas.errors import MigrationError
from schemas.evolution import check_step, parse_migrations
from schemas.migrate import (
    build_steps,
    convert_value,
    join_values,
    project_down,
    split_value,
    upcast_groups,
)
from schemas.wire import MAX_SAFE_INT

V1 = """
version = 1
[collections.tasks]
scope_field = "route"
[collections.tasks.fields]
route = { type = "string" }
eta = { type = "int" }
notes = { type = "string" }
name = { type = "string" }
"""
V2 = """
version = 2
[[migrations]]
op = "rename"
collection = "tasks"
from = "notes"
to = "note"
[collections.tasks]
scope_field = "route"
[collections.tasks.fields]
route = { type = "string" }
eta = { type = "int" }
note = { type = "string" }
name = { type = "string" }
added = { type = "bool" }
"""
V3 = """
version = 3
[[migrations]]
op = "convert"
collection = "tasks"
field = "eta"
[[migrations]]
op = "split"
collection = "tasks"
from = "name"
to = ["first", "last"]
[collections.tasks]
scope_field = "route"
[collections.tasks.fields]
route = { type = "string" }
eta = { type = "string" }
note = { type = "string" }
first = { type = "string" }
last = { type = "string" }
added = { type = "bool" }
"""


def load(text: str) -> tuple[Catalog, Any]:
    doc = tomllib.loads(text)
    return parse_catalog(doc), parse_migrations(doc.get("migrations"))


def chain(since: int = 1) -> tuple[Catalog, list[Any], Catalog]:
    versions = [load(t) for t in (V1, V2, V3)]
    for (a, _), (b, m) in itertools.pairwise(versions):
        check_step(a, b, m)
    base = versions[since - 1][0]
    return base, build_steps(base, versions[since:]), versions[-1][0]


def test_change_from_version_1_is_upcast_to_version_3() -> None:
    _base, steps, _ = chain()
    out = upcast_groups({"f": {"eta": 1764000000001, "notes": "ring twice", "name": "Ada King"}},
                        "tasks", steps)
    assert out["f"] == {"eta": "1764000000001", "note": "ring twice",
                        "first": "Ada", "last": "King"}


def test_record_of_version_3_is_projected_down_to_version_1() -> None:
    base, steps, _ = chain()
    rec = {"f": {"eta": "1764000000001", "note": "n", "first": "Ada", "last": "King",
                 "added": True, "route": "r1"},
           "h": {"eta": "h1", "note": "h2", "first": "h3", "last": "h4", "added": "h5"}}
    out = project_down(rec, "tasks", steps, base.collections["tasks"].fields)
    assert out["f"] == {"eta": 1764000000001, "notes": "n", "name": "Ada King", "route": "r1"}
    assert out["h"] == {"eta": "h1", "notes": "h2", "name": "h4"}


def test_partial_record_uses_the_whole_record_for_a_split() -> None:
    base, steps, _ = chain(2)
    out = project_down({"f": {"last": "Lovelace"}, "h": {"last": "h9"}}, "tasks", steps,
                       base.collections["tasks"].fields,
                       whole={"first": "Ada", "last": "Lovelace"})
    assert out["f"] == {"name": "Ada Lovelace"}


def test_unconvertible_value_raises_on_upcast_and_is_left_out_on_projection() -> None:
    with pytest.raises(MigrationError, match="not an integer"):
        convert_value("soon", "string", "int")
    base, steps, _ = chain(2)
    out = project_down({"f": {"eta": "soon"}, "h": {"eta": "h1"}}, "tasks", steps,
                       base.collections["tasks"].fields)
    assert out["f"] == {} and out["h"] == {}


def test_merge_of_a_partial_change_reads_the_current_value() -> None:
    v1, _ = load(V1)
    doc = tomllib.loads("""
version = 2
[[migrations]]
op = "merge"
collection = "tasks"
from = ["notes", "name"]
to = "both"
sep = "|"
[collections.tasks]
scope_field = "route"
[collections.tasks.fields]
route = { type = "string" }
eta = { type = "int" }
both = { type = "string" }
""")
    v2, migs = parse_catalog(doc), parse_migrations(doc["migrations"])
    check_step(v1, v2, migs)
    steps = build_steps(v1, [(v2, migs)])
    out = upcast_groups({"f": {"name": "new"}}, "tasks", steps,
                        lookup=lambda field: "old notes|old name" if field == "both" else None)
    assert out["f"] == {"both": "old notes|new"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.sampled_from([" ", "|", "--"]), st.integers(2, 5))
def test_property_join_undoes_split(value: str, sep: str, n: int) -> None:
    parts = split_value(value, sep, n)
    assert len(parts) == n
    assert join_values(parts, sep) == value


@settings(max_examples=300, deadline=None)
@given(st.integers(-MAX_SAFE_INT, MAX_SAFE_INT))
def test_property_int_string_round_trip(value: int) -> None:
    assert convert_value(convert_value(value, "int", "string"), "string", "int") == value


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_property_float_string_round_trip(value: float) -> None:
    assert convert_value(convert_value(value, "float", "string"), "string", "float") == value


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3)),
       st.sampled_from(["string", "int", "float", "bool", "json"]),
       st.sampled_from(["string", "int", "float", "bool", "json"]))
def test_property_convert_returns_the_target_type_or_raises(value: Any, src: str,
                                                             dst: str) -> None:
    try:
        out = convert_value(value, src, dst)
    except MigrationError:
        return
    if value is None or src == dst or dst == "json":
        assert out is value or out == value
        return
    expected = {"string": str, "int": int, "float": (int, float), "bool": bool}[dst]
    assert isinstance(out, expected)
    if dst == "int":
        assert not isinstance(out, bool) and abs(out) <= MAX_SAFE_INT


@settings(max_examples=200, deadline=None)
@given(st.integers(-MAX_SAFE_INT, MAX_SAFE_INT), st.text(max_size=20),
       st.text(alphabet="abc ", max_size=20))
def test_property_upcast_then_project_down_is_identity(eta: int, notes: str, name: str) -> None:
    base, steps, _ = chain()
    written = {"eta": eta, "notes": notes, "name": name}
    up = upcast_groups({"f": written}, "tasks", steps)
    down = project_down({"f": up["f"]}, "tasks", steps, base.collections["tasks"].fields)
    assert down["f"] == written
