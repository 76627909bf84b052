"""Checks shared by the query tests: index entries against the views, and query results
against the brute-force reference (tests.agent.query.reference)."""

from __future__ import annotations

import itertools
from typing import Any

from agent.api import Agent
from agent.query.indexes import entries
from agent.query.maintain import load_registry
from agent.view import ViewState
from tests.agent.query import reference


def views(ag: Agent, collection: str) -> list[ViewState]:
    prefix = collection.encode() + b"\0"

    def run(work: Any) -> list[ViewState]:
        return [ViewState.from_doc(collection, raw[len(prefix):].decode(), doc)
                for raw, doc in work.tx.items("view", prefix)]

    return ag._core.read(run)


def assert_indexes_consistent(ag: Agent) -> None:
    """Every index entry is exactly what the views imply: none missing, none stale, none
    of an index the registry does not keep."""

    def run(work: Any) -> None:
        registry = load_registry(work.tx)
        expected: dict[bytes, bytes] = {}
        for ix in registry.indexes:
            assert ix.state == "ready", ix
            prefix = ix.collection.encode() + b"\0"
            for raw, doc in work.tx.items("view", prefix):
                view = ViewState.from_doc(ix.collection, raw[len(prefix):].decode(), doc)
                expected.update(entries(ix, view))
        actual: dict[bytes, bytes] = {}
        with work.tx.cursor("index") as cur:
            for key, value in cur:
                actual[bytes(key)] = bytes(value)
        assert actual.keys() - expected.keys() == set(), "stale index entries"
        assert expected.keys() - actual.keys() == set(), "missing index entries"
        assert actual == expected

    ag._core.read(run)


def all_pages(ag: Agent, query: dict[str, Any], limit: int) -> list[Any]:
    """Every record of `query`, following cursors `limit` at a time."""
    out: list[Any] = []
    after = None
    for _ in range(10_000):
        page = ag.query({**query, "limit": limit, "after": after})
        assert len(page.records) <= limit
        out += page.records
        after = page.next
        if after is None:
            return out
        assert len(page.records) == limit, "a page before the last is full"
    raise AssertionError("cursor never ended")


def assert_query_matches_reference(ag: Agent, query: dict[str, Any], limit: int = 3) -> None:
    """The query's records (all pages) are exactly the brute-force selection of the views,
    each once, in the order asked; count() agrees."""
    c = query["collection"]
    where = {name: (ops if isinstance(ops, dict) else {"eq": ops})
             for name, ops in query.get("where", {}).items()}
    include_deleted = query.get("include_deleted", False)
    truth = reference.select(views(ag, c), where, include_deleted)
    got = all_pages(ag, query, limit)
    got_keys = [r.key for r in got]
    assert len(got_keys) == len(set(got_keys)), f"a record repeated: {got_keys}"
    assert set(got_keys) == {v.k for v in truth}, (query, got_keys, [v.k for v in truth])
    by_key = {v.k: v for v in truth}
    for record in got:
        view = by_key[record.key]
        assert record.fields == view.fields and record.deleted == view.x
    order = query.get("order_by")
    if order is not None:
        values = [reference.value(by_key[k], order) for k in got_keys]
        sign = -1 if query.get("desc") else 1
        for a, b in itertools.pairwise(values):
            assert sign * reference.compare(a, b) <= 0, (order, values)
    assert ag.count(query) == len(truth)


__all__ = ["all_pages", "assert_indexes_consistent", "assert_query_matches_reference", "views"]
