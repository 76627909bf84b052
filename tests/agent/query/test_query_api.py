"""Agent.query / Agent.count on a real store with the example schema's indexes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from agent.api import Agent
from agent.errors import BadRequest
from agent.query import CursorInvalid, IndexRequired, Query, QueryError
from schemas import wire

STATUSES = ("out", "delivered", "failed")


def _fill(agent: Agent, n: int = 30) -> None:
    for i in range(n):
        agent.put("tasks", f"t{i:03d}", {
            "route": "route-42" if i % 2 else "depot-7", "status": STATUSES[i % 3],
            "eta": 1000 - 7 * (i % 10), "customer": f"{'Acme' if i % 4 == 0 else 'Bolt'} {i}"})


def keys(page: Any) -> list[str]:
    return [r.key for r in page.records]


def test_equality_and_order_through_an_index(agent: Agent) -> None:
    """eq + order_by returns only matching records, ordered by the field (asc and desc),
    and names the index used."""
    _fill(agent)
    page = agent.query("tasks", where={"status": "out"}, order_by="eta")
    assert page.index == "status,eta" and page.next is None
    assert all(r.fields["status"] == "out" for r in page.records)
    assert len(page.records) == 10
    etas = [r.fields["eta"] for r in page.records]
    assert etas == sorted(etas)
    down = agent.query("tasks", where={"status": "out"}, order_by="eta", desc=True)
    assert keys(down) == list(reversed(keys(page)))


def test_range_prefix_and_in(agent: Agent) -> None:
    """Ranges, prefixes and IN lists select what they say, combined with AND."""
    _fill(agent)
    page = agent.query("tasks", where={"route": "route-42", "eta": {"gte": 965, "lt": 993}},
                       order_by="eta")
    assert page.index == "route,eta"
    assert {r.key for r in page.records} == {
        f"t{i:03d}" for i in range(30)
        if i % 2 and 965 <= 1000 - 7 * (i % 10) < 993}
    acme = agent.query("tasks", where={"customer": {"prefix": "Acme "}})
    assert {r.key for r in acme.records} == {f"t{i:03d}" for i in range(0, 30, 4)}
    both = agent.query("tasks", where={"status": {"in": ["failed", "out"]}}, order_by="eta",
                       limit=1000)
    assert {r.fields["status"] for r in both.records} == {"failed", "out"}
    assert len(both.records) == 20
    etas = [r.fields["eta"] for r in both.records]
    assert etas == sorted(etas), "IN ranges are merged into one order"
    by_status = agent.query("tasks", where={"status": {"in": ["out", "failed"]}},
                            order_by="status")
    assert [r.fields["status"] for r in by_status.records] == ["failed"] * 10 + ["out"] * 10


def test_set_field_member_query(agent: Agent) -> None:
    """A set field is queried by one member: the records holding it, each once."""
    _fill(agent, 6)
    agent.add("tasks", "t001", "labels", ["fragile", "heavy"])
    agent.add("tasks", "t004", "labels", ["fragile"])
    page = agent.query("tasks", where={"labels": "fragile"}, order_by="eta")
    assert keys(page) == ["t004", "t001"]
    assert keys(agent.query("tasks", where={"labels": "heavy"})) == ["t001"]
    with pytest.raises(QueryError, match="set field: filter it by one member"):
        agent.query("tasks", where={"labels": {"in": ["fragile", "heavy"]}})
    with pytest.raises(QueryError, match="cannot be ordered"):
        agent.query("tasks", where={"labels": "fragile"}, order_by="labels")


def test_pages_follow_each_other_with_a_cursor(agent: Agent) -> None:
    """Pages of `limit` records, chained by cursor, give the whole result once, in order;
    the last page has no cursor."""
    _fill(agent)
    whole = keys(agent.query("tasks", where={"status": {"in": list(STATUSES)}},
                             order_by="eta", limit=1000))
    seen: list[str] = []
    after = None
    for _ in range(20):
        page = agent.query("tasks", where={"status": {"in": list(STATUSES)}}, order_by="eta",
                           limit=7, after=after)
        seen += keys(page)
        after = page.next
        if after is None:
            break
    assert seen == whole and len(whole) == 30


def test_cursor_is_stable_under_concurrent_writes(agent: Agent) -> None:
    """Records that did not change between pages are neither repeated nor skipped, while
    other records are inserted, moved and deleted around the cursor."""
    _fill(agent)
    q: dict[str, Any] = {"where": {"route": "route-42"}, "order_by": "eta", "limit": 5}
    first = agent.query("tasks", **q)
    before = keys(agent.query("tasks", **{**q, "limit": 1000}))
    agent.put("tasks", "new-early", {"route": "route-42", "eta": 1})     # before the cursor
    agent.put("tasks", "new-late", {"route": "route-42", "eta": 99999})  # after it
    moved = before[8]
    agent.put("tasks", moved, {"eta": 0})                                # moves before it
    gone = before[10]
    agent.delete("tasks", gone)
    rest: list[str] = []
    after = first.next
    while after is not None:
        page = agent.query("tasks", **q, after=after)
        rest += keys(page)
        after = page.next
    unchanged_after = [k for k in before[5:] if k not in (moved, gone)]
    assert [k for k in rest if k in unchanged_after] == unchanged_after
    assert not set(keys(first)) & set(rest)
    assert "new-late" in rest and "new-early" not in rest and moved not in rest


def test_count_and_deleted_records(agent: Agent) -> None:
    """count() counts matches; deleted records are left out unless include_deleted."""
    _fill(agent)
    assert agent.count("tasks") == 30
    assert agent.count("tasks", where={"status": "failed"}) == 10
    agent.delete("tasks", "t002")
    assert agent.count("tasks") == 29
    assert agent.count("tasks", include_deleted=True) == 30
    assert "t002" not in keys(agent.query("tasks", limit=1000))
    deleted = agent.query("tasks", include_deleted=True, limit=1000)
    assert [r.deleted for r in deleted.records if r.key == "t002"] == [True]
    assert agent.count("tasks", where={"status": "failed"}) == 9, "its fields are gone"
    assert agent.count("tasks", where={"status": {"eq": None}}, include_deleted=True) == 1


def test_records_carry_their_sync_state(agent: Agent) -> None:
    """Query results are the records agent.get returns: pending until the ack, then synced."""
    agent.put("tasks", "t-1", {"route": "route-42", "status": "out", "eta": 5})
    rec = agent.query("tasks", where={"status": "out"}).records[0]
    assert rec == agent.get("tasks", "t-1")
    assert rec.pending == 1 and set(rec.sync.values()) == {"pending"}
    batch = agent.sync.next_batch()
    agent.sync.apply_ack(wire.Ack(ok=[(n, "route-42", 1) for n in batch.numbers]))
    rec = agent.query("tasks", where={"status": "out"}).records[0]
    assert rec.pending == 0 and set(rec.sync.values()) == {"synced"}


def test_no_filter_reads_in_key_order(agent: Agent) -> None:
    """Without filter or order, records come in key order with no index."""
    _fill(agent, 12)
    page = agent.query("tasks", limit=5)
    assert page.index is None and keys(page) == [f"t{i:03d}" for i in range(5)]
    page2 = agent.query("tasks", limit=5, after=page.next)
    assert keys(page2) == [f"t{i:03d}" for i in range(5, 10)]


def test_query_is_plain_json_both_ways(agent: Agent) -> None:
    """A Query serialises to JSON and back unchanged and runs the same; a page serialises."""
    _fill(agent)
    query = Query.model_validate({"collection": "tasks",
                                  "where": {"status": "out", "eta": {"gte": 970}},
                                  "order_by": "eta", "limit": 3})
    text = orjson.dumps(query.to_json_dict())
    again = Query.model_validate_json(text)
    assert again == query
    page = agent.query(again)
    assert keys(page) == keys(agent.query(query))
    assert orjson.loads(orjson.dumps(page.to_dict()))["records"][0]["collection"] == "tasks"
    assert keys(agent.query(orjson.loads(text))) == keys(page)


def test_missing_index_is_refused_naming_the_index_to_add(agent: Agent) -> None:
    """A filter or order no index serves is refused, never scanned, and the message names
    the index to add and where."""
    with pytest.raises(IndexRequired) as err:
        agent.query("tasks", where={"status": "out", "notes": {"prefix": "x"}})
    assert err.value.code == "index_required"
    assert err.value.fields == ("status", "notes")
    assert '["status", "notes"]' in str(err.value)
    assert "[collections.tasks]" in str(err.value)
    with pytest.raises(IndexRequired, match='add \\["route", "customer"\\]'):
        agent.query("tasks", where={"route": "route-42"}, order_by="customer")
    with pytest.raises(IndexRequired, match="order by eta"):
        agent.query("tasks", where={"customer": "x"}, order_by="eta")
    with pytest.raises(IndexRequired, match="\\$scope"):
        agent.count("inspections", where={"$scope": "fleet"})


@pytest.mark.parametrize(("options", "message"), [
    ({"where": {"nope": 1}}, "tasks has no field 'nope'"),
    ({"where": {"eta": "soon"}}, "tasks.eta is a int field: eq 'soon' is a string"),
    ({"where": {"status": {"gt": 5}}}, "status is a string field: gt 5 is a number"),
    ({"where": {"eta": {"gte": 1, "lt": "z"}}}, "is a int field"),
    ({"where": {"eta": {"prefix": "1"}}}, "prefix applies to strings"),
    ({"where": {"proof": 1}}, "json field"),
    ({"where": {"status": {}}}, "needs an operator"),
    ({"where": {"status": {"like": "x"}}}, "like"),
    ({"where": {"status": {"gt": None}}}, "null has no order"),
    ({"where": {"status": ["a"]}}, "use {\"in\": \\[...\\]}"),
    ({"where": {"status": {"in": []}}}, "at least 1"),
    ({"where": {"status": {"in": ["x"] * 257}}}, "at most 256"),
    ({"where": {f"f{i}": 1 for i in range(17)}}, "at most 16"),
    ({"where": {"status": "x" * 5000}}, "at most 4096"),
    ({"where": {"eta": float("nan")}}, "finite"),
    ({"where": {"eta": True}}, "eq True is a bool"),
    ({"where": "status = 'out'"}, "where"),
    ({"limit": 0}, "limit"),
    ({"limit": 5000}, "limit"),
    ({"desc": True}, "desc needs order_by"),
    ({"order_by": "labels"}, "cannot be ordered"),
    ({"include_deleted": "yes"}, "include_deleted"),
    ({"where": {"bad-name": 1}}, "where"),
])
def test_malformed_queries_get_clear_errors(agent: Agent, options: dict[str, Any],
                                            message: str) -> None:
    """Every malformed query is refused with BadRequest saying what is wrong."""
    with pytest.raises(BadRequest, match=message):
        agent.query("tasks", **options)


def test_unknown_collection_and_hostile_cursors(agent: Agent) -> None:
    """Unknown collections, forged or foreign cursors and oversize cursors are refused."""
    _fill(agent)
    with pytest.raises(BadRequest, match="unknown collection 'nope'"):
        agent.query("nope")
    with pytest.raises(BadRequest, match="unknown collection"):
        agent.count({"collection": "nope"})
    page = agent.query("tasks", where={"status": "out"}, order_by="eta", limit=2)
    assert page.next is not None
    with pytest.raises(CursorInvalid, match="another query"):
        agent.query("tasks", where={"status": "failed"}, order_by="eta", after=page.next)
    for junk in ("!!!", "AAAA", "", page.next[:3]):
        with pytest.raises(CursorInvalid):
            agent.query("tasks", where={"status": "out"}, order_by="eta", after=junk)
    with pytest.raises(QueryError, match="after"):
        agent.query("tasks", after="A" * 20000)
    with pytest.raises(QueryError, match="a query is a Query"):
        agent.query(42)  # type: ignore[arg-type]
