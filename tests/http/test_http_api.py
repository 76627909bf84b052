"""The local API does everything the Python API does, over a real Unix socket."""

from __future__ import annotations

import stat
from pathlib import Path

from agent.api import Agent
from agent.http import models
from agent.http.server import ApiServer
from schemas import wire
from tests.agent.agentkit import rec
from tests.http.httpkit import Client

S = "route-42"
T1 = "/v1/collections/tasks/records/t-1"


def test_put_answers_pending_with_change_id_and_get_shows_sync_state(client: Client) -> None:
    """A write answers 202 "pending" with its change id; get shows per-field state."""
    r = client.call("PATCH", T1, {"fields": {"route": S, "status": "out"}})
    assert r.status == 202
    out = models.WriteResultOut.model_validate(r.body)
    assert out.state == "pending" and out.change_id == "van-1:1"
    assert out.message == "saved locally (change van-1:1), pending sync"
    r = client.call("GET", T1)
    assert r.status == 200
    record = models.RecordOut.model_validate(r.body)
    assert record.fields == {"route": S, "status": "out"} and record.pending == 1
    assert record.sync == {"route": "pending", "status": "pending"}


def test_every_write_kind(client: Client, api: tuple[ApiServer, Agent]) -> None:
    """increment, add, remove and delete go through to the store, each a change."""
    client.call("PATCH", T1, {"fields": {"route": S}})
    assert client.call("POST", T1 + "/increment", {"field": "attempts", "amount": 2}
                       ).status == 202
    assert client.call("POST", T1 + "/add", {"field": "labels", "members": ["a", "b"]}
                       ).status == 202
    assert client.call("POST", T1 + "/remove", {"field": "labels", "members": ["a"]}
                       ).status == 202
    r = client.call("POST", T1 + "/remove", {"field": "labels", "members": ["zz"]})
    assert r.status == 200 and r.body["state"] == "unchanged"
    _, agent = api
    record = agent.get("tasks", "t-1")
    assert record is not None
    assert record.fields == {"route": S, "attempts": 2, "labels": ["b"]}
    assert client.call("DELETE", T1).status == 202
    assert client.call("GET", T1).status == 404
    assert [e["ch"]["n"] for e in agent.pending()] == [1, 2, 3, 4, 5]


def test_list_pages_with_after(client: Client) -> None:
    """list returns records in key order; `after` continues where a page ended."""
    for i in range(5):
        client.call("PATCH", f"/v1/collections/tasks/records/t-{i}", {"fields": {"route": S}})
    first = client.call("GET", "/v1/collections/tasks/records?limit=2").body["records"]
    assert [r["key"] for r in first] == ["t-0", "t-1"]
    rest = client.call("GET", "/v1/collections/tasks/records?after=t-1").body["records"]
    assert [r["key"] for r in rest] == ["t-2", "t-3", "t-4"]
    models.RecordList.model_validate({"records": rest})


def test_status_says_pending_and_that_the_sync_loop_is_not_running(client: Client) -> None:
    """status carries the pending count, the summary and sync_running."""
    client.call("PATCH", T1, {"fields": {"route": S}})
    r = client.call("GET", "/v1/status")
    st = models.StatusOut.model_validate(r.body)
    assert st.pending == 1 and not st.online and st.sync_running is False
    assert "1 change saved locally, waiting for connection" in st.summary


def test_conflicts_and_settling_a_manual_field(client: Client,
                                               api: tuple[ApiServer, Agent]) -> None:
    """An open conflict is listed; resolving it writes the field as a pending change."""
    _, agent = api
    cands = [{"v": "Dock 4", "by": "van-7", "h": "0190000000010000:van-7"}]
    agent.sync.apply_delta(wire.Delta(d=[rec("t-5", 1, {"route": S, "address": "Gate 1"},
                                             cf={"address": cands})]))
    found = models.ConflictList.model_validate(client.call("GET", "/v1/conflicts").body)
    assert [(c.kind, c.key, c.field) for c in found.conflicts] == [("open", "t-5", "address")]
    r = client.call("POST", "/v1/collections/tasks/records/t-5/fields/address/resolve",
                    {"value": "Dock 4"})
    assert r.status == 202, r.body
    assert agent.pending()[0]["ch"]["f"] == {"address": "Dock 4"}


def test_dead_letters_list_retry_discard(client: Client, api: tuple[ApiServer, Agent]) -> None:
    """Dead letters are listed, retried as a new change, or discarded."""
    _, agent = api
    client.call("PATCH", T1, {"fields": {"route": S, "status": "x"}})
    client.call("PATCH", "/v1/collections/tasks/records/t-2", {"fields": {"route": S}})
    agent.sync.apply_reject(wire.Reject(rj=[
        wire.Rejection(n=1, code="rule_rejected", reason="r", perm=True),
        wire.Rejection(n=2, code="rule_rejected", reason="r", perm=True)]))
    listed = models.DeadLetterList.model_validate(client.call("GET", "/v1/deadletters").body)
    assert [d.n for d in listed.dead_letters] == [1, 2]
    r = client.call("POST", "/v1/deadletters/1/retry")
    assert r.status == 202 and r.body["change_id"] == "van-1:3"
    r = client.call("DELETE", "/v1/deadletters/2")
    assert r.status == 200 and r.body == {"n": 2, "discarded": True}
    assert client.call("GET", "/v1/deadletters").body == {"dead_letters": []}
    assert client.call("DELETE", "/v1/deadletters/2").status == 404


def test_socket_has_the_configured_mode(api: tuple[ApiServer, Agent]) -> None:
    """The Unix socket lives in the store's directory with mode 0660 (the outer wall)."""
    server, _ = api
    assert server.socket_path is not None
    st = Path(server.socket_path).stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660


def test_big_values_travel_in_the_body(client: Client) -> None:
    """A 60 KB value (more than fits comfortably on a command line) is written whole."""
    big = "x" * 60_000
    assert client.call("PATCH", T1, {"fields": {"route": S, "proof": {"sig": big}}}
                       ).status == 202
    assert client.call("GET", T1).body["fields"]["proof"] == {"sig": big}


def test_every_json_answer_ends_with_a_newline(client: Client) -> None:
    """`curl` prints each answer on a line of its own (README, "The local API in two
    minutes"): before, documents ran together, `}{"collection"...`, and into the prompt."""
    for target in ("/v1/status", "/v1/collections/tasks/records/nope", "/v1/nowhere"):
        client.conn.request("GET", target, headers={"Authorization": f"Bearer {client.token}"})
        resp = client.conn.getresponse()
        payload = resp.read()
        assert payload.endswith(b"}\n") and payload.count(b"\n") == 1, (target, payload)
