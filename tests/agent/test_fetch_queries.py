"""The device's fetch-by-query queue on a real LMDB store (agent.fetch_queries,
PROTOCOL.md §7.14.1): answers bring evicted records back whole, retention counts from
the fetch, answers are idempotent, and the queue is bounded."""

from __future__ import annotations

import pytest

from agent import evict, fetch_queries
from agent.api import Agent
from agent.errors import BadRequest, NotFound
from agent.store import record_key
from schemas import wire
from tests.agent.agentkit import FakeClock, assert_views_consistent, rec

S = "route-42"
DAY = 86_400
DONE = {"route": S, "status": "delivered", "eta": 5}


def _answer(agent: Agent, msg: wire.FetchedQuery) -> fetch_queries.QueryRequest | None:
    result: fetch_queries.QueryRequest | None = agent.sync.core.write(
        lambda work: fetch_queries.apply_answer(work, msg))
    return result


def _next(agent: Agent) -> wire.FetchQuery | None:
    request: wire.FetchQuery | None = agent.sync.core.write(fetch_queries.next_request)
    return request


def test_answer_brings_evicted_records_back_and_retention_counts_from_the_fetch(
        agent: Agent, clock: FakeClock) -> None:
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 3, DONE), rec("t-2", 4, DONE)]))
    clock.advance(8 * DAY)
    assert evict.run_pass(agent.sync.core) == 2
    asked = agent.fetch_query("tasks", {"status": "delivered"}, limit=1)
    request = _next(agent)
    assert request is not None and request.req == asked.id and request.lim == 1
    assert _next(agent) is None  # sent: not again before the resend delay
    clock.advance(fetch_queries.RESEND_MS / 1000 + 1)
    again = _next(agent)
    assert again is not None and again.req == asked.id
    # An answer holding more than `lim` keys (a hostile server) is applied, but the
    # request remembers only `lim` of them; a record of another collection is dropped.
    part = wire.FetchedQuery(req=asked.id, c="tasks", recs=[
        rec("t-1", 3, DONE), rec("t-2", 4, DONE),
        rec("i-9", 1, {"vehicle": "v", "checked_at": 1}, c="inspections")], end=False)
    assert _answer(agent, part) is not None
    end = wire.FetchedQuery(req=asked.id, c="tasks", end=True, next="t-2", stop="limit",
                            scanned=3)
    done = _answer(agent, end)
    assert done is not None and done.state == "done" and done.keys == ["t-1"]
    assert _answer(agent, end) is None and _answer(agent, part) is None  # settled
    assert agent.get("tasks", "t-1") is not None and agent.get("tasks", "t-2") is not None
    assert agent.get("inspections", "i-9") is None
    assert agent.evicted_keys("tasks") == []
    assert_views_consistent(agent)
    # Kept for the retention period counted from the fetch, then evicted again.
    clock.advance(6 * DAY)
    assert evict.run_pass(agent.sync.core) == 0
    clock.advance(2 * DAY)
    assert evict.run_pass(agent.sync.core) == 2
    status = agent.fetch_query_status(asked.id)
    assert status.records == [] and status.next == "t-2"


def test_answer_to_another_collection_or_unknown_request_changes_nothing(
        agent: Agent) -> None:
    asked = agent.fetch_query("tasks", {})
    stray = wire.FetchedQuery(req=asked.id, c="inspections",
                              recs=[rec("i-1", 1, {"vehicle": "v"}, c="inspections")])
    assert _answer(agent, stray) is None
    assert _answer(agent, wire.FetchedQuery(req="q-unknown", c="tasks",
                                            recs=[rec("t-9", 1, DONE)])) is None
    assert agent.get("inspections", "i-1") is None and agent.get("tasks", "t-9") is None
    assert agent.fetch_query_status(asked.id).state == "waiting"


def test_queue_is_bounded_and_drops_settled_requests_first(agent: Agent) -> None:
    ids = [agent.fetch_query("tasks", {"eta": {"gte": i}}).id
           for i in range(fetch_queries.MAX_REQUESTS)]
    with pytest.raises(BadRequest) as err:
        agent.fetch_query("tasks", {})
    assert err.value.code == "too_many"
    _answer(agent, wire.FetchedQuery(req=ids[5], c="tasks", end=True))
    newest = agent.fetch_query("tasks", {})
    assert newest.state == "waiting" and agent.status().fetch_queries == len(ids)
    with pytest.raises(NotFound, match="no fetch query"):
        agent.fetch_query_status(ids[5])
    assert agent.sync.core.read(lambda work: work.tx.count(fetch_queries.DB)) == len(ids)


def test_records_asked_by_key_leave_that_queue_when_a_query_brings_them(agent: Agent) -> None:
    agent.fetch("tasks", ["t-1"])
    asked = agent.fetch_query("tasks", {})
    _answer(agent, wire.FetchedQuery(req=asked.id, c="tasks", recs=[rec("t-1", 3, DONE)]))
    assert not agent.sync.core.read(
        lambda work: work.tx.has("fetch", record_key("tasks", "t-1")))
    assert agent.status().fetching == 0
