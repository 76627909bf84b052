"""The index registry (pure): reconciling with the schema, ids never reused."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.query.indexes import Registry

FIELDS = st.sampled_from([("a",), ("b",), ("a", "b"), ("b", "a"), ("$scope", "a")])
SCHEMAS = st.dictionaries(st.sampled_from(["tasks", "inventory"]),
                          st.lists(FIELDS, unique=True, max_size=3), max_size=2)


@given(st.lists(SCHEMAS, min_size=1, max_size=6))
def test_reconcile_follows_every_schema_change(schemas: list[dict[str, list[tuple[str, ...]]]],
                                               ) -> None:
    """After each reconcile the kept (not dropped) indexes are exactly the declared ones;
    an index kept across schemas keeps its id and state; ids are never given twice;
    a removed index is marked for dropping, never forgotten before its entries go."""
    registry = Registry()
    given_ids: set[int] = set()
    for schema in schemas:
        before = {(ix.collection, ix.fields): ix for ix in registry.indexes
                  if ix.state != "drop"}
        registry = registry.reconcile(schema)
        kept = {(ix.collection, ix.fields): ix for ix in registry.indexes
                if ix.state != "drop"}
        assert set(kept) == {(c, f) for c, fs in schema.items() for f in fs}
        for key, ix in kept.items():
            if key in before:
                assert ix == before[key]
            else:
                assert ix.state == "build" and ix.id not in given_ids
        for key, ix in before.items():
            if key not in kept:
                assert any(d.id == ix.id and d.state == "drop" for d in registry.indexes)
        ids = [ix.id for ix in registry.indexes]
        assert len(ids) == len(set(ids)) and all(i < registry.next_id for i in ids)
        given_ids.update(ids)
        assert Registry.from_doc(registry.to_doc()) == registry
        assert registry.reconcile(schema) == registry, "reconciling twice changes nothing"
