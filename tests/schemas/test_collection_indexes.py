"""Index declarations in collection schemas: accepted forms and clear refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas.collection import example_catalog_path, load_catalog, parse_catalog
from schemas.errors import CollectionSchemaError


def _doc(indexes: Any) -> dict[str, Any]:
    return {"version": 1, "collections": {"tasks": {
        "scope_field": "route", "indexes": indexes,
        "fields": {"route": {"type": "string"}, "status": {"type": "string"},
                   "eta": {"type": "int"}, "done": {"type": "bool"},
                   "weight": {"type": "float", "merge": "counter"},
                   "labels": {"type": "set"}, "zones": {"type": "set"},
                   "proof": {"type": "json"}}}}}


def test_single_compound_and_scope_indexes_are_accepted() -> None:
    """A name, a list of names, and $scope are index declarations, kept in order."""
    catalog = parse_catalog(_doc(["status", ["route", "eta"], ["$scope", "done", "weight"],
                                  ["labels", "eta"], {"fields": ["eta"]}]))
    assert [ix.fields for ix in catalog.collections["tasks"].indexes] == [
        ("status",), ("route", "eta"), ("$scope", "done", "weight"), ("labels", "eta"),
        ("eta",)]
    assert catalog.collections["tasks"].indexes[1].name == "route,eta"


def test_the_example_schema_declares_indexes() -> None:
    """The shipped example schema loads, with its indexes."""
    catalog = load_catalog(example_catalog_path())
    assert ("route", "eta") in [ix.fields for ix in catalog.collections["tasks"].indexes]


@pytest.mark.parametrize(("indexes", "message"), [
    ("status", "indexes must be a list"),
    ([["stauts"]], "index \\['stauts'\\]: no field 'stauts' in this collection \\(fields: "
                   "route, status"),
    (["proof"], "field 'proof' is of type 'json', whose values .* have no order"),
    ([["status"], "status"], "index \\['status'\\] is declared twice"),
    ([["eta", "eta"]], "field 'eta' is named twice"),
    ([["labels", "zones"]], "at most one set field per index"),
    ([[]], "needs at least one field"),
    ([[1, 2]], "an index is a field name or a list of field names"),
    ([{"fields": ["eta"], "name": "x"}], "an index is a field name or a list"),
    ([["eta"] * 9], "at most 8 fields per index"),
    ([[f"f{i}"] for i in range(17)], "at most 16 per collection"),
    (["$key"], "no field '\\$key'"),
])
def test_bad_index_declarations_are_refused(indexes: Any, message: str) -> None:
    """Each mistake is refused with a message naming the source, collection, index and
    field."""
    with pytest.raises(CollectionSchemaError, match=message) as err:
        parse_catalog(_doc(indexes), source="fleet.toml")
    assert str(err.value).startswith("fleet.toml: collection 'tasks': ")


def test_index_error_from_a_file_names_the_file(tmp_path: Path) -> None:
    """load_catalog reports an index mistake with the file's path."""
    path = tmp_path / "fleet.toml"
    path.write_text('version = 1\n[collections.tasks]\nscope = "fleet"\n'
                    'indexes = ["nope"]\n[collections.tasks.fields]\nx = { type = "string" }\n')
    with pytest.raises(CollectionSchemaError, match=f"{path}: collection 'tasks': index "
                                                    "\\['nope'\\]: no field 'nope'"):
        load_catalog(path)
