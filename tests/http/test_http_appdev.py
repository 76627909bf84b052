"""What an app developer following docs/agent-api.md and docs/QUERIES.md word for word
runs into: each test is a step of that walk-through that once went wrong."""

from __future__ import annotations

import socket
import urllib.parse
from pathlib import Path

import orjson
import pytest

from agent import evict
from agent.api import Agent
from agent.http.server import ApiServer
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import rec
from tests.http.httpkit import Client, issue, running_api
from tests.http.test_http_query import LiveSse
from waystation.config import AgentConfig

S = "route-42"
T1 = "/v1/collections/tasks/records/t-1"


def test_a_repeated_delete_has_nothing_to_do(client: Client,
                                             api: tuple[ApiServer, Agent]) -> None:
    """An app retrying a DELETE (its first answer lost) gets 200 "unchanged", not a
    second tombstone sent to the server with a newer stamp."""
    _, agent = api
    client.call("PATCH", T1, {"fields": {"route": S}})
    assert client.call("DELETE", T1).status == 202
    again = client.call("DELETE", T1)
    assert again.status == 200, again.body
    assert again.body["state"] == "unchanged" and again.body["change_id"] is None
    assert again.body["message"] == "tasks/t-1: nothing to change"
    assert [e["ch"]["n"] for e in agent.pending()] == [1, 2]
    txn = client.call("POST", "/v1/txn",
                      {"ops": [{"op": "delete", "collection": "tasks", "key": "t-1"}]})
    assert txn.status == 200 and txn.body["change_ids"] == [], txn.body
    assert [e["ch"]["n"] for e in agent.pending()] == [1, 2]


def test_a_query_object_copied_with_its_collection(api: tuple[ApiServer, Agent],
                                                   client: Client, token: str) -> None:
    """QUERIES.md shows the query as JSON with its `collection`: posted as it stands it is
    answered (query, count, live); naming another collection than the URL is refused."""
    server, _ = api
    assert server.socket_path is not None
    client.call("PATCH", T1, {"fields": {"route": S, "status": "out", "eta": 5}})
    q = {"collection": "tasks", "where": {"status": "out"}, "order_by": "eta", "desc": False,
         "limit": 100, "after": None, "include_deleted": False}
    page = client.call("POST", "/v1/collections/tasks/query", q)
    assert page.status == 200, page.body
    assert [r["key"] for r in page.body["records"]] == ["t-1"]
    count = client.call("POST", "/v1/collections/tasks/count",
                        {"collection": "tasks", "where": {"status": "out"}})
    assert count.status == 200 and count.body == {"count": 1}, count.body
    wrong = client.call("POST", "/v1/collections/tasks/query", {**q, "collection": "inventory"})
    assert wrong.status == 422 and wrong.body["code"] == "invalid"
    assert "the body names 'inventory' but the URL 'tasks'" in wrong.body["message"]
    live = LiveSse(server.socket_path, token, "/v1/collections/tasks/live?q="
                   + urllib.parse.quote(orjson.dumps(q)))
    try:
        assert live.status == 200
        [first] = live.updates(1)
        assert first["initial"] and first["keys"] == ["t-1"]
    finally:
        live.close()


def test_an_unknown_field_names_the_schema_version_the_device_runs(
        client: Client, api: tuple[ApiServer, Agent]) -> None:
    """An app written for an older schema (a field renamed since, the device having taken
    the new version from the server) is told which version the device runs, on a
    single write, inside a transaction, and in a query."""
    _, agent = api
    version = agent.catalog.version
    hint = (f"this device runs schema version {version} (GET /v1/status: schema_version): "
            "use that version's field names")
    single = client.call("PATCH", T1, {"fields": {"route": S, "colour": "red"}})
    assert single.status == 422 and single.body["code"] == "unknown_field"
    assert "tasks has no field 'colour'" in single.body["message"]
    assert hint in single.body["message"]
    txn = client.call("POST", "/v1/txn", {"ops": [
        {"op": "put", "collection": "tasks", "key": "t-2", "fields": {"route": S}},
        {"op": "put", "collection": "tasks", "key": "t-3", "fields": {"colour": "red"}}]})
    assert txn.status == 422 and txn.body["code"] == "unknown_field"
    assert txn.body["message"].startswith("ops.1: ") and hint in txn.body["message"]
    assert txn.body["message"].endswith("; nothing was written")
    query = client.call("POST", "/v1/collections/tasks/query", {"where": {"colour": "red"}})
    assert query.status == 422 and hint in query.body["message"], query.body
    assert client.call("GET", "/v1/status").body["schema_version"] == version


def test_a_key_percent_encoded_from_bytes_that_are_not_utf8_is_refused(
        client: Client) -> None:
    """"/records/%FF" once wrote the record "%FF" (the router left the escape as it was),
    the same record as "/records/%25FF"; a UTF-8 key, percent-encoded, still works."""
    bad = client.call("PATCH", "/v1/collections/tasks/records/t-%FF", {"fields": {"route": S}})
    assert bad.status == 422 and bad.body["code"] == "invalid", bad.body
    assert "not UTF-8" in bad.body["message"]
    assert client.call("GET", "/v1/collections/tasks/records/t-%25FF").status == 404
    good = client.call("PATCH", "/v1/collections/tasks/records/t-%C3%A9-%25FF",
                       {"fields": {"route": S, "notes": "Crème 🍮"}})
    assert good.status == 202 and good.body["key"] == "t-é-%FF", good.body
    got = client.call("GET", "/v1/collections/tasks/records/t-%C3%A9-%25FF")
    assert got.status == 200 and got.body["fields"]["notes"] == "Crème 🍮"


def test_the_path_encoding_is_checked_once_per_request(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check ran once per path parameter (twice on a record route, three times on
    a resolve): once per request is enough, the raw path is the same."""
    import agent.http.inputs as inputs

    calls: list[str] = []
    real = inputs.unquote_to_bytes

    def counting(raw: str) -> bytes:
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(inputs, "unquote_to_bytes", counting)
    r = client.call("PATCH", "/v1/collections/tasks/records/t-%C3%A9", {"fields": {"route": S}})
    assert r.status == 202 and calls == ["/v1/collections/tasks/records/t-%C3%A9"]
    calls.clear()
    r = client.call("POST", "/v1/collections/tasks/records/t-%FF/fields/address/resolve",
                    {"value": "x"})
    assert r.status == 422 and "not UTF-8" in r.body["message"] and len(calls) == 1


def test_a_token_sent_without_bearer_is_told_how_to_send_it(
        api: tuple[ApiServer, Agent], token: str) -> None:
    """`Authorization: wst_...` (the scheme left out) was answered "not valid (removed, or
    mistyped)" although the token is valid; now the answer says how to send it."""
    server, _ = api
    assert server.socket_path is not None
    for header, got in ((token, "the token alone"), (f"Basic {token}", "'Basic'"),
                        (f"Token {token}", "'Token'")):
        bare = Client(server.socket_path, None)
        try:
            r = bare.call("GET", "/v1/status", headers={"Authorization": header})
        finally:
            bare.close()
        assert r.status == 401 and r.body["code"] == "unauthorized", r.body
        assert r.body["message"] == ("send the app token as Authorization: Bearer <token> "
                                     f"(got {got})")
        assert token not in r.body["message"]
    ok = Client(server.socket_path, None)
    try:
        r = ok.call("GET", "/v1/status", headers={"Authorization": f"bearer {token}"})
    finally:
        ok.close()
    assert r.status == 200


def test_live_queries_opened_at_once_stay_within_the_client_limit(
        cfg: AgentConfig, catalog: Catalog) -> None:
    """Live queries requested at the same moment were all admitted (each checked the
    count, then opened its query on the store pool before counting itself): an app
    opening a dozen at start-up went past api.max_feed_clients."""
    capped = cfg.model_copy(update={"api": cfg.api.model_copy(
        update={"max_feed_clients": 2})})
    token = issue(Path(cfg.data_dir))
    q = urllib.parse.quote(orjson.dumps({"where": {"status": "out"}, "order_by": "eta"}))
    head = (f"GET /v1/collections/tasks/live?q={q} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n").encode()
    with running_api(capped, catalog) as (server, _):
        socks = []
        try:
            for _ in range(12):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(30)
                sock.connect(str(server.socket_path))
                socks.append(sock)
            for sock in socks:  # every request in before any answer
                sock.sendall(head)
            statuses = []
            for sock in socks:
                buf = b""
                while b"\r\n" not in buf:
                    buf += sock.recv(4096)
                statuses.append(int(buf.split(b" ")[1]))
        finally:
            for sock in socks:
                sock.close()
    assert sorted(statuses) == [200, 200] + [503] * 10, statuses


def test_a_record_evicted_by_retention_can_be_deleted(
        client: Client, api: tuple[ApiServer, Agent]) -> None:
    """deploy/README.md, "Retention": a write on an evicted record is saved as usual. A
    DELETE was refused ("no record ... to delete") while a PATCH went through."""
    _, agent = api
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 3, {"route": S, "status": "delivered"})]))
    assert evict.run_pass(agent.sync.core, pressure=True) == 1
    assert client.call("GET", T1).status == 404
    r = client.call("DELETE", T1)
    assert r.status == 202 and r.body["scope"] == S, r.body
    [entry] = agent.pending()
    assert entry["ch"]["op"] == "del" and entry["ch"]["k"] == "t-1"
    assert client.call("GET", T1).status == 404
    assert client.call("DELETE", T1).status == 200  # deleted now: nothing to do
    never = client.call("DELETE", "/v1/collections/tasks/records/never")
    assert never.status == 422 and never.body["code"] == "invalid"
