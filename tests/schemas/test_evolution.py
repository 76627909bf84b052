"""Schema evolution: diff classification, migration declarations, refusal of uncovered
breaking changes (schemas.evolution), with property tests over generated schemas."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.collection import Catalog, parse_catalog
from schemas.errors import CollectionSchemaError, SchemaEvolutionError
from schemas.evolution import (
    Convert,
    Rename,
    Split,
    check_step,
    diff,
    parse_migrations,
)

BASE = """
version = 1
[collections.tasks]
scope_field = "route"
indexes = ["eta"]
[collections.tasks.fields]
route = { type = "string" }
eta = { type = "int" }
notes = { type = "string", max_length = 100 }
stock = { type = "int", merge = "counter", min = 0 }
name = { type = "string" }
"""


def cat(text: str) -> Catalog:
    return parse_catalog(tomllib.loads(text), "test.toml")


def with_changes(version: int, fields: dict[str, str], extra: str = "",
                 indexes: str = '["eta"]') -> tuple[Catalog, Any]:
    body = "\n".join(f"{k} = {v}" for k, v in fields.items())
    text = (f"version = {version}\n{extra}\n[collections.tasks]\nscope_field = \"route\"\n"
            f"indexes = {indexes}\n[collections.tasks.fields]\n{body}\n")
    doc = tomllib.loads(text)
    return parse_catalog(doc, "new.toml"), parse_migrations(doc.get("migrations"), "new.toml")


BASE_FIELDS = {
    "route": '{ type = "string" }',
    "eta": '{ type = "int" }',
    "notes": '{ type = "string", max_length = 100 }',
    "stock": '{ type = "int", merge = "counter", min = 0 }',
    "name": '{ type = "string" }',
}


def kinds(old: Catalog, new: Catalog) -> dict[tuple[str, str | None], tuple[str, bool]]:
    return {(d.kind, d.field): (d.detail, d.compatible) for d in diff(old, new)}


def test_identical_versions_have_no_difference() -> None:
    old = cat(BASE)
    new, _ = with_changes(2, BASE_FIELDS)
    assert diff(old, new) == []
    assert check_step(old, new, ()) == []


def test_compatible_changes_are_classified_and_accepted() -> None:
    old = cat(BASE)
    fields = dict(BASE_FIELDS, extra='{ type = "bool" }',
                  notes='{ type = "string", max_length = 500 }',
                  stock='{ type = "float", merge = "counter", min = -5 }')
    extra = ('[collections.inspections]\nscope = "fleet"\n'
             '[collections.inspections.fields]\nvehicle = { type = "string" }\n')
    new, migs = with_changes(2, fields, indexes='["eta", "name"]')
    new = parse_catalog({**tomllib.loads(extra), **{
        "version": 2, "collections": {**tomllib.loads(extra)["collections"],
                                      "tasks": new.collections["tasks"].model_dump()}}})
    found = {(d.kind, d.field) for d in diff(old, new)}
    assert found == {("new_collection", None), ("new_field", "extra"),
                     ("widened_bound", "notes"), ("widened_type", "stock"),
                     ("widened_bound", "stock"), ("new_index", None)}
    assert all(d.compatible for d in diff(old, new))
    check_step(old, new, migs)


@pytest.mark.parametrize("change,kind", [
    ({"eta": '{ type = "string" }'}, "type_change"),
    ({"notes": '{ type = "string", max_length = 10 }'}, "narrowed_bound"),
    ({"stock": '{ type = "int", merge = "counter", min = 5 }'}, "narrowed_bound"),
    ({"name": '{ type = "set" }'}, "type_change"),
    ({"eta": '{ type = "int", merge = "counter" }'}, "strategy_change"),
])
def test_breaking_change_without_migration_is_refused(change: dict[str, str],
                                                       kind: str) -> None:
    old = cat(BASE)
    new, migs = with_changes(2, dict(BASE_FIELDS, **change))
    assert any(d.kind == kind and not d.compatible for d in diff(old, new))
    with pytest.raises(SchemaEvolutionError, match="breaking change without a migration"):
        check_step(old, new, migs)


def test_removed_field_is_breaking_and_the_error_says_what_to_declare() -> None:
    old = cat(BASE)
    fields = {k: v for k, v in BASE_FIELDS.items() if k != "notes"}
    new, _ = with_changes(2, fields)
    with pytest.raises(SchemaEvolutionError) as err:
        check_step(old, new, ())
    assert "removed_field" in str(err.value) and 'op = "remove"' in str(err.value)


def test_rename_and_convert_declared_are_accepted() -> None:
    old = cat(BASE)
    fields = {k: v for k, v in BASE_FIELDS.items() if k != "notes"}
    fields["note"] = '{ type = "string", max_length = 100 }'
    fields["eta"] = '{ type = "string" }'
    migs = ('[[migrations]]\nop = "rename"\ncollection = "tasks"\nfrom = "notes"\nto = "note"\n'
            '[[migrations]]\nop = "convert"\ncollection = "tasks"\nfield = "eta"\n')
    new, parsed = with_changes(2, fields, extra=migs)
    assert parsed == (Rename(collection="tasks", src="notes", dst="note"),
                      Convert(collection="tasks", field="eta"))
    out = check_step(old, new, parsed)
    assert {(d.kind, d.field) for d in out} == {("removed_field", "notes"),
                                                ("new_field", "note"),
                                                ("type_change", "eta")}


def test_rename_then_type_change_needs_the_convert_too() -> None:
    old = cat(BASE)
    fields = {k: v for k, v in BASE_FIELDS.items() if k != "eta"}
    fields["due"] = '{ type = "string" }'
    migs = '[[migrations]]\nop = "rename"\ncollection = "tasks"\nfrom = "eta"\nto = "due"\n'
    new, parsed = with_changes(2, fields, extra=migs, indexes='["due"]')
    with pytest.raises(SchemaEvolutionError, match=r"type_change .*tasks\.due"):
        check_step(old, new, parsed)


def test_split_and_merge_declared() -> None:
    old = cat(BASE)
    fields = {k: v for k, v in BASE_FIELDS.items() if k != "name"}
    fields["first"] = '{ type = "string" }'
    fields["last"] = '{ type = "string" }'
    migs = ('[[migrations]]\nop = "split"\ncollection = "tasks"\nfrom = "name"\n'
            'to = ["first", "last"]\n')
    new, parsed = with_changes(2, fields, extra=migs)
    assert parsed == (Split(collection="tasks", src="name", dst=("first", "last")),)
    check_step(old, new, parsed)


@pytest.mark.parametrize("migration,message", [
    ('op = "rename"\ncollection = "tasks"\nfrom = "nope"\nto = "x"', "not in the previous"),
    ('op = "rename"\ncollection = "tasks"\nfrom = "eta"\nto = "name"', "already exists"),
    ('op = "convert"\ncollection = "tasks"\nfield = "stock"', "only lww / manual"),
    ('op = "narrow"\ncollection = "tasks"\nfield = "stock"', "counter"),
    ('op = "remove"\ncollection = "tasks"\nfield = "eta"', "still in this version"),
    ('op = "drop_collection"\ncollection = "tasks"', "still in this version"),
    ('op = "convert"\ncollection = "ghost"\nfield = "x"', "not in the previous version"),
    ('op = "split"\ncollection = "tasks"\nfrom = "eta"\nto = ["a", "b"]', "string lww"),
])
def test_migrations_that_do_not_fit_are_refused(migration: str, message: str) -> None:
    old = cat(BASE)
    new, parsed = with_changes(2, BASE_FIELDS, extra=f"[[migrations]]\n{migration}\n")
    with pytest.raises(SchemaEvolutionError, match=message):
        check_step(old, new, parsed)


@pytest.mark.parametrize("raw,message", [
    ("nope", "array of tables"),
    (["x"], "must be a table"),
    ([{"op": "explode"}], "'op' must be one of"),
    ([{"op": "rename", "collection": "tasks", "from": "a"}], "to"),
    ([{"op": "rename", "collection": "tasks", "from": "a", "to": "b", "x": 1}], "x"),
    ([{"op": "split", "collection": "tasks", "from": "a", "to": ["b", "b"]}], "twice"),
    ([{"op": "split", "collection": "tasks", "from": "a", "to": ["b", "no pe"]}], "valid"),
    ([{"op": "merge", "collection": "tasks", "from": ["a"], "to": "b"}], "at least 2"),
    ([{"op": "rename", "collection": "Bad Name", "from": "a", "to": "b"}], "collection"),
])
def test_hostile_migration_declarations(raw: Any, message: str) -> None:
    with pytest.raises(SchemaEvolutionError, match=message):
        parse_migrations(raw, "x.toml")


def test_version_must_go_up() -> None:
    old = cat(BASE)
    new, _ = with_changes(1, BASE_FIELDS)
    with pytest.raises(SchemaEvolutionError, match="bump 'version'"):
        check_step(old, new, ())


def test_catalog_file_with_migrations_still_loads() -> None:
    doc = tomllib.loads(BASE + '[[migrations]]\nop = "remove"\ncollection = "t"\nfield = "x"\n')
    assert parse_catalog(doc, "f.toml").version == 1
    with pytest.raises(CollectionSchemaError, match="unknown top-level key 'junk'"):
        parse_catalog({**doc, "junk": 1}, "f.toml")


# --- properties ---------------------------------------------------------------------

TYPES = ["string", "int", "float", "bool", "json"]
field_names = st.sampled_from(["a", "b", "c", "d", "e", "f"])


@st.composite
def field_specs(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([*TYPES, "set"]))
    spec: dict[str, Any] = {"type": kind}
    if kind in ("int", "float"):
        if draw(st.booleans()):
            spec["min"] = draw(st.integers(-10, 0))
        if draw(st.booleans()):
            spec["max"] = draw(st.integers(1, 10))
    if kind in ("string", "set") and draw(st.booleans()):
        spec["max_length"] = draw(st.integers(1, 50))
    if kind == "set":
        spec["merge"] = "set"
    return spec


@st.composite
def catalogs(draw: st.DrawFn, version: int) -> Catalog:
    fields = draw(st.dictionaries(field_names, field_specs(), min_size=0, max_size=5))
    fields["route"] = {"type": "string"}
    return parse_catalog({"version": version, "collections": {
        "tasks": {"scope_field": "route", "fields": fields}}})


@settings(max_examples=200, deadline=None)
@given(catalogs(1), catalogs(2))
def test_property_diff_is_empty_exactly_for_equal_schemas(old: Catalog, new: Catalog) -> None:
    differences = diff(old, new)
    same = old.collections["tasks"].fields == new.collections["tasks"].fields
    assert (differences == []) == same
    assert diff(old, old) == []


@settings(max_examples=200, deadline=None)
@given(catalogs(1), catalogs(2))
def test_property_check_accepts_iff_every_difference_is_compatible(old: Catalog,
                                                                   new: Catalog) -> None:
    differences = diff(old, new)
    try:
        check_step(old, new, ())
        accepted = True
    except SchemaEvolutionError:
        accepted = False
    assert accepted == all(d.compatible for d in differences)


@settings(max_examples=200, deadline=None)
@given(catalogs(1), catalogs(2))
def test_property_widening_is_not_widening_backwards(old: Catalog, new: Catalog) -> None:
    # A bound or type that widened one way narrows the other way: going back is breaking.
    forward = {(d.field, d.detail.split(" ")[0]) for d in diff(old, new)
               if d.kind in ("widened_bound",)}
    back = {(d.field, d.detail.split(" ")[0]) for d in diff(new, old)
            if d.kind == "narrowed_bound"}
    assert forward == back
