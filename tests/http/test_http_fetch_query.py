"""Fetch by query over the local API (PROTOCOL.md §7.14.1): queued, answered, read back
by id; wrong and hostile bodies refused without queueing; read rights enforced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import evict, fetch_queries
from agent.api import Agent
from agent.http import models
from agent.http.fetch_routes import FetchQueryOut
from agent.http.server import ApiServer
from schemas import wire
from tests.agent.agentkit import rec
from tests.http.httpkit import Client, issue

S = "route-42"
FETCHQ = "/v1/collections/tasks/fetch-query"
DONE = {"route": S, "status": "delivered"}


def test_fetch_query_queues_then_reads_back_the_answer(client: Client,
                                                       api: tuple[ApiServer, Agent]) -> None:
    """An evicted record is asked for by query (no sync loop: the call does not wait);
    once the server's answer is applied, the request reads back `done` with the record."""
    _, agent = api
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 3, DONE)]))
    assert evict.run_pass(agent.sync.core, pressure=True) == 1
    r = client.call("POST", FETCHQ, {"where": {"status": "delivered"}, "limit": 5,
                                     "wait_s": 30})
    assert r.status == 200, r.body
    out = FetchQueryOut.model_validate(r.body)
    assert out.state == "waiting" and out.records == [] and out.collection == "tasks"
    st = models.StatusOut.model_validate(client.call("GET", "/v1/status").body)
    assert st.fetch_queries == 1 and st.evicted == 1
    agent.sync.core.write(lambda work: fetch_queries.apply_answer(work, wire.FetchedQuery(
        req=out.id, c="tasks", recs=[rec("t-1", 3, DONE)], end=True, next="t-1",
        stop="limit", scanned=9)))
    got = FetchQueryOut.model_validate(
        client.call("GET", f"/v1/fetch-queries/{out.id}?wait_s=1").body)
    assert got.state == "done" and [x.key for x in got.records] == ["t-1"]
    assert got.records[0].fields == DONE
    assert (got.next, got.stop, got.scanned, got.error) == ("t-1", "limit", 9, None)
    assert client.call("GET", "/v1/collections/tasks/records/t-1").status == 200
    assert client.call("GET", "/v1/status").body["fetch_queries"] == 0


@pytest.mark.parametrize("body", [
    {"where": "status = 'x'"}, {"where": {"nope": 1}}, {"where": {"eta": "soon"}},
    {"where": {"eta": [1, 2]}}, {"where": {"eta": {"ne": 1}}},
    {"where": {"eta": {"gt": 2**60}}}, {"where": {"eta": {"eq": {"a": 1}}}},
    {"where": {f"f{i}": 1 for i in range(17)}}, {"where": {"status": {"in": []}}},
    {"limit": 0}, {"limit": 1001}, {"limit": "5"}, {"after": ""}, {"after": "x" * 201},
    {"after": "a\u0000b"}, {"wait_s": 31}, {"extra": 1},
])
def test_bad_fetch_query_bodies_are_refused(client: Client, body: dict[str, Any]) -> None:
    """Wrong bodies answer 4xx with a code, and queue nothing."""
    r = client.call("POST", FETCHQ, body)
    assert r.status in (400, 422), r.body
    assert r.body["code"]
    assert client.call("GET", "/v1/status").body["fetch_queries"] == 0


def test_unknown_collection_and_request(client: Client) -> None:
    r = client.call("POST", "/v1/collections/nope/fetch-query", {})
    assert r.status == 404 and r.body["code"] == "unknown_collection"
    assert client.call("GET", "/v1/fetch-queries/q-nothing").status == 404
    assert client.call("GET", "/v1/fetch-queries/q-1?wait_s=abc").status == 422


def test_fetch_query_needs_read_rights(api: tuple[ApiServer, Agent], cfg: Any,
                                       client: Client) -> None:
    """An app without read rights on the collection may neither ask nor read back."""
    server, _ = api
    assert server.socket_path is not None
    rid = client.call("POST", FETCHQ, {}).body["id"]
    token = issue(Path(cfg.data_dir), app="other", read=("inventory",), write=())
    c = Client(server.socket_path, token)
    try:
        assert c.call("POST", FETCHQ, {}).status == 403
        assert c.call("GET", f"/v1/fetch-queries/{rid}").status == 403
    finally:
        c.close()
