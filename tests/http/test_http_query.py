"""Queries over the local API: pages with cursors, counts, live queries as SSE, and what
a wrong or hostile query gets."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import orjson

from agent.api import Agent
from agent.http.query_routes import LiveUpdateOut
from agent.http.server import ApiServer
from schemas import wire
from tests.agent.agentkit import rec
from tests.http.httpkit import Client, issue
from tests.http.test_http_feed import Sse

S = "route-42"


class LiveSse(Sse):
    """An SSE reader for live-query events (`result`, `update`)."""

    def updates(self, count: int) -> list[dict[str, Any]]:
        return self.blocks(count, _live_update)


def _live_update(fields: dict[bytes, bytes], doc: dict[str, Any]) -> None:
    assert int(fields[b"id"]) == doc["seq"]
    assert fields[b"event"] == (b"result" if doc["initial"] else b"update")
    LiveUpdateOut.model_validate(doc)


def _seed(client: Client) -> None:
    for i in range(12):
        status = "out" if i % 3 else "done"
        client.call("PATCH", f"/v1/collections/tasks/records/t-{i:02d}",
                    {"fields": {"route": S, "status": status, "eta": 1000 + i}})


def test_query_pages_with_a_cursor_and_counts(client: Client) -> None:
    """A query through an index, page by page with the cursor, and its count."""
    _seed(client)
    q = {"where": {"status": "out"}, "order_by": "eta", "limit": 5}
    first = client.call("POST", "/v1/collections/tasks/query", q)
    assert first.status == 200
    keys = [r["key"] for r in first.body["records"]]
    assert len(keys) == 5 and first.body["next"] and first.body["index"]
    second = client.call("POST", "/v1/collections/tasks/query",
                         {**q, "after": first.body["next"]})
    more = [r["key"] for r in second.body["records"]]
    assert second.body["next"] is None
    expected = [f"t-{i:02d}" for i in range(12) if i % 3]
    assert keys + more == expected
    count = client.call("POST", "/v1/collections/tasks/count", {"where": {"status": "out"}})
    assert count.status == 200 and count.body == {"count": len(expected)}
    assert client.call("POST", "/v1/collections/tasks/count").body == {"count": 12}


def test_query_refusals_are_clear_json(client: Client) -> None:
    """Bad queries answer JSON errors naming what to change."""
    _seed(client)
    no_index = client.call("POST", "/v1/collections/tasks/query", {"where": {"notes": "x"}})
    assert no_index.status == 422 and no_index.body["code"] == "index_required"
    bad = client.call("POST", "/v1/collections/tasks/query", {"where": {"eta": {"gt": None}}})
    assert bad.status == 422 and bad.body["code"] == "bad_query"
    extra = client.call("POST", "/v1/collections/tasks/query", {"collection": "inventory"})
    assert extra.status == 422 and extra.body["code"] == "invalid"
    nope = client.call("POST", "/v1/collections/nope/query", {})
    assert nope.status == 404 and nope.body["code"] == "unknown_collection"
    junk = client.call("POST", "/v1/collections/tasks/query", raw=b"{nope")
    assert junk.status == 400 and junk.body["code"] == "bad_json"
    huge = client.call("POST", "/v1/collections/tasks/query",
                       {"where": {"status": {"in": ["x"] * 5000}}})
    assert huge.status == 422


def test_query_needs_read_rights(api: tuple[ApiServer, Agent], cfg: Any) -> None:
    """An app without read rights on the collection gets 403."""
    server, _ = api
    assert server.socket_path is not None
    token = issue(Path(cfg.data_dir), "kiosk", read=("inspections",), write=())
    client = Client(server.socket_path, token)
    try:
        reply = client.call("POST", "/v1/collections/tasks/query", {})
        assert reply.status == 403 and reply.body["code"] == "forbidden"
    finally:
        client.close()


def test_live_query_streams_entered_changed_left(api: tuple[ApiServer, Agent],
                                                 client: Client, token: str) -> None:
    """The first page, then local writes, an ack and another device's delta as row
    diffs on one SSE stream."""
    server, agent = api
    assert server.socket_path is not None
    _seed(client)
    q = urllib.parse.quote(orjson.dumps({"where": {"status": "done"}, "order_by": "eta"}))
    live = LiveSse(server.socket_path, token, f"/v1/collections/tasks/live?q={q}")
    try:
        assert live.status == 200
        [first] = live.updates(1)
        assert first["initial"] and first["keys"] == ["t-00", "t-03", "t-06", "t-09"]
        client.call("PATCH", "/v1/collections/tasks/records/t-01", {"fields": {"status": "done"}})
        [entered] = live.updates(1)
        assert [r["key"] for r in entered["entered"]] == ["t-01"]
        client.call("PATCH", "/v1/collections/tasks/records/t-00", {"fields": {"status": "out"}})
        [left] = live.updates(1)
        assert left["left"] == ["t-00"]
        agent.sync.apply_delta(wire.Delta(d=[rec("r-1", 7, {"route": S, "status": "done",
                                                           "eta": 1})]))
        [remote] = live.updates(1)
        assert remote["keys"][0] == "r-1"
    finally:
        live.close()


def test_live_query_hostile_parameters(api: tuple[ApiServer, Agent], token: str) -> None:
    """A live query's q must be a JSON object of bounded size."""
    server, _ = api
    assert server.socket_path is not None
    for q, status in (("%7Bnope", 400), ("%5B1%5D", 422), ("x" * 5000, 413)):
        live = LiveSse(server.socket_path, token, f"/v1/collections/tasks/live?q={q}")
        assert live.status == status, q[:20]
        live.close()
