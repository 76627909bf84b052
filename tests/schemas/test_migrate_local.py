"""A device's own records carried across schema versions (schemas.migrate_local): up
along the declared migrations when it takes a version, down again after a rollback."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import CollectionSchemaError
from schemas.migrate_local import downcast_groups, downcast_record, parse_version, upcast_record
from schemas.wire import MAX_SAFE_INT
from tests.schemas.test_migrate import V1, V3, chain

FIELDS = ("route", "eta", "notes", "name")
texts = st.text(max_size=20)
values = {"route": texts, "notes": texts, "name": texts,
          "eta": st.integers(-MAX_SAFE_INT, MAX_SAFE_INT)}


@st.composite
def records(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    """Base-record field maps of version 1: values, per-field versions, stamps."""
    names = draw(st.sets(st.sampled_from(FIELDS)))
    f = {n: draw(values[n] | st.none()) for n in names}
    fq = {n: draw(st.integers(1, 10**9)) for n in names}
    h = {n: f"{draw(st.integers(0, 2**40)):016x}:van-1" for n in names}
    return {"f": f, "fq": fq, "h": h, "t": {}, "cf": {}}


def test_record_of_version_1_is_carried_up_to_version_3() -> None:
    """Renamed, converted and split, stamps and versions following their values."""
    _, steps, _ = chain()
    out = upcast_record({"f": {"notes": "n", "eta": 17, "name": "Ada King", "route": "r"},
                         "fq": {"notes": 3, "eta": 4, "name": 5, "route": 1},
                         "h": {"notes": "h1", "eta": "h2", "name": "h3"}}, "tasks", steps)
    assert out is not None
    assert out["f"] == {"note": "n", "eta": "17", "first": "Ada", "last": "King", "route": "r"}
    assert out["fq"] == {"note": 3, "eta": 4, "first": 5, "last": 5, "route": 1}
    assert out["h"] == {"note": "h1", "eta": "h2", "first": "h3", "last": "h3"}


@settings(max_examples=100, deadline=None)
@given(records())
def test_property_down_undoes_up(maps: dict[str, dict[str, Any]]) -> None:
    """Taking a version and rolling it back gives the record back unchanged."""
    base, steps, _ = chain()
    up = upcast_record(maps, "tasks", steps)
    assert up is not None
    down = downcast_record(up, "tasks", steps, base.collections["tasks"].fields)
    assert {g: down[g] for g in ("f", "fq", "h")} == {g: maps[g] for g in ("f", "fq", "h")}


@settings(max_examples=50, deadline=None)
@given(records())
def test_property_other_collections_are_untouched(maps: dict[str, dict[str, Any]]) -> None:
    _, steps, _ = chain()
    assert upcast_record(maps, "inventory", steps) == maps


def test_unconvertible_value_is_left_out_with_its_stamp() -> None:
    """Going down, "soon" is no int: the field is dropped, never guessed."""
    base, steps, _ = chain(2)
    out = downcast_record({"f": {"eta": "soon", "note": "x"}, "fq": {"eta": 2, "note": 3},
                           "h": {"eta": "h", "note": "g"}}, "tasks", steps,
                          base.collections["tasks"].fields)
    assert out["f"] == {"note": "x"} and out["fq"] == {"note": 3} and out["h"] == {"note": "g"}


def test_pending_change_groups_go_down_with_renames() -> None:
    base, steps, _ = chain()
    out = downcast_groups({"f": {"note": "n", "eta": "5", "first": "A", "last": "B"},
                           "i": {}, "a": {}, "r": {}}, "tasks", steps,
                          base.collections["tasks"].fields)
    assert out["f"] == {"notes": "n", "eta": 5, "name": "A B"}


@pytest.mark.parametrize(("text", "problem"), [
    ("x" * 101, "at most 100"),
    ("version = [", "not valid TOML"),
    ("version = 2\n[collections.t]\nscope_field = 3\n", "t"),
    (V3.replace('op = "convert"', 'op = "explode"'), "'op' must be one of"),
])
def test_parse_version_refuses_what_is_no_schema_file(text: str, problem: str) -> None:
    with pytest.raises(CollectionSchemaError, match=problem):
        parse_version(text, "pushed", 100 if len(text) > 100 and problem.startswith("at")
                      else 10**6)


def test_parse_version_reads_a_schema_file() -> None:
    catalog, migrations = parse_version(V1, "pushed", 10**6)
    assert catalog.version == 1 and migrations == ()
