"""Retention over the local API: fetch by key, the quota in status and on writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import evict, fetching
from agent.api import Agent
from agent.http import models
from agent.http.fetch_routes import FetchOut
from agent.http.server import ApiServer
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg, rec
from tests.http.httpkit import Client, issue, running_api

S = "route-42"
FETCH = "/v1/collections/tasks/fetch"
DONE = {"route": S, "status": "delivered"}


def _evict_one(agent: Agent) -> None:
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 3, DONE)]))
    assert evict.run_pass(agent.sync.core, pressure=True) == 1


def test_fetch_queues_and_answers_what_it_holds(client: Client,
                                                api: tuple[ApiServer, Agent]) -> None:
    """An evicted key waits (no sync loop: the call does not wait); once the server's
    answer is applied, the same call returns the record; status counts both."""
    _, agent = api
    _evict_one(agent)
    assert client.call("GET", "/v1/collections/tasks/records/t-1").status == 404
    r = client.call("POST", FETCH, {"keys": ["t-1"], "wait_s": 30})
    assert r.status == 200
    out = FetchOut.model_validate(r.body)
    assert out.waiting == ["t-1"] and out.records == [] and out.missing == []
    st = models.StatusOut.model_validate(client.call("GET", "/v1/status").body)
    assert st.evicted == 1 and st.fetching == 1
    agent.sync.core.write(lambda work: fetching.apply_fetched(work, wire.Fetched(
        req="f", c="tasks", recs=[rec("t-1", 3, DONE)])))
    out = FetchOut.model_validate(client.call("POST", FETCH, {"keys": ["t-1"]}).body)
    assert [r.key for r in out.records] == ["t-1"] and out.waiting == []
    assert out.records[0].fields == DONE


@pytest.mark.parametrize("body", [
    {}, {"keys": []}, {"keys": [f"k{i}" for i in range(101)]}, {"keys": "t-1"},
    {"keys": [""]}, {"keys": ["x" * 201]}, {"keys": [1]}, {"keys": ["t"], "wait_s": 31},
    {"keys": ["t"], "wait_s": -1}, {"keys": ["t"], "extra": 1}, {"keys": ["a\u0000b"]},
])
def test_bad_fetch_bodies_are_refused(client: Client, body: dict[str, Any]) -> None:
    """Wrong bodies answer 422 (or 400) with a code, and queue nothing."""
    r = client.call("POST", FETCH, body)
    assert r.status in (400, 422), r.body
    assert r.body["code"]
    st = client.call("GET", "/v1/status").body
    assert st["fetching"] == 0


def test_fetch_of_an_unknown_collection_is_404(client: Client) -> None:
    r = client.call("POST", "/v1/collections/nope/fetch", {"keys": ["k"]})
    assert r.status == 404 and r.body["code"] == "unknown_collection"


def test_fetch_needs_read_rights(api: tuple[ApiServer, Agent], cfg: Any) -> None:
    """An app without read rights on the collection may not fetch it."""
    server, _ = api
    assert server.socket_path is not None
    token = issue(Path(cfg.data_dir), app="other", read=("inventory",), write=())
    c = Client(server.socket_path, token)
    try:
        assert c.call("POST", FETCH, {"keys": ["t-1"]}).status == 403
    finally:
        c.close()


def test_quota_in_status_and_on_writes(short_dir: Path, catalog: Catalog) -> None:
    """At the quota a write answers 507 quota_reached; status says so."""
    cfg = make_cfg(short_dir / "q", quota_bytes=1 << 20)
    with running_api(cfg, catalog) as (server, _agent):
        assert server.socket_path is not None
        client = Client(server.socket_path, issue(Path(cfg.data_dir)))
        try:
            for i in range(2000):
                r = client.call("PATCH", f"/v1/collections/tasks/records/w-{i}",
                                {"fields": {"route": S, "notes": "x" * 1800}})
                if r.status != 202:
                    break
            else:
                raise AssertionError("the quota was never reached")
            assert r.status == 507 and r.body["code"] == "quota_reached"
            assert "storage.quota_bytes" in r.body["message"]
            st = models.StatusOut.model_validate(client.call("GET", "/v1/status").body)
            assert st.quota is not None and st.quota.reached
            assert "disk quota reached" in st.summary
        finally:
            client.close()
