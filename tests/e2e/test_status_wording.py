"""Status wording with real processes on both fleets: a device that never connected, one
whose store was re-created, and the agent's three surfaces (text, --json, the local API)
saying the same thing."""

from __future__ import annotations

import http.client
import json
import re
import shutil

import orjson
import pytest

from tests.e2e.fleet import Fleet
from tests.helpers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

S = "route-1"


def _devices_text(fleet: Fleet) -> dict[str, str]:
    """`server devices` rows by device id (the whole line)."""
    out = fleet.cli("server", "devices", "--config", str(fleet.server_config)).stdout
    return {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}


def _api_status(port: int, token: str) -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/v1/status", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        assert resp.status == 200
        doc: dict[str, object] = orjson.loads(resp.read())
        return doc
    finally:
        conn.close()


def _ages(summary: str) -> str:
    return re.sub(r"\b\d+ (s|min|h|d)\b", "N", summary)


def test_never_connected_then_a_recreated_store(fleet: Fleet) -> None:
    """Enrolled, agent never run: the device says to start its daemon, the server says it
    never connected (not merely "offline"). Later its store is deleted and the agent
    starts afresh: the server names the re-created store."""
    path = fleet.add_device("van-1", [S])
    fleet.agent("van-1").put("tasks", "t-1", {"route": S})
    text = fleet.cli("agent", "status", "--config", str(path)).stdout
    assert "the sync daemon has not run on this store yet" in text
    assert "1 change saved locally" in text
    assert "never connected" in _devices_text(fleet)["van-1"]

    fleet.start_agent("van-1")
    fleet.wait_drained("van-1")
    row = fleet.wait(lambda: ((r := _devices_text(fleet)["van-1"]).split()[1] == "online"
                     and r) or None, 30, what="server devices: van-1 online")
    assert "never connected" not in row and "re-created" not in row

    assert fleet.stop_agent("van-1") == 0
    fleet.close_agents()
    shutil.rmtree(fleet.agent_config("van-1").data_dir)
    fleet.start_agent("van-1")
    row = fleet.wait(lambda: ((r := _devices_text(fleet)["van-1"]) and "re-created" in r
                     and r) or None, 30, what="server devices names the new store")
    assert "store re-created at " in row and "(2 stores seen)" in row
    doc = next(d for d in json.loads(fleet.cli("server", "devices", "--json", "--config",
                                               str(fleet.server_config)).stdout)
               if d["id"] == "van-1")
    assert doc["store"]["incarnations_seen"] == 2  # the JSON form's figure agrees


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_text_json_and_api_say_the_same(fleet: Fleet) -> None:
    """The first line of `agent status`, `--json`'s summary and GET /v1/status's summary
    are one text (one function), whatever the state: here changes held while the merge
    server is stopped; `--json` and GET /v1/status have the same fields. Then the
    broker stops too: the held changes' reason is said as last heard.

    On the embedded fleet only: the three are one function of the device's status, the
    same on any fleet; a server group down as each broker carries it (a killed server's
    will: "server unavailable since") is tested on both fleets in test_sync_policy."""
    port = free_port()
    path = fleet.add_device("van-1", [S])
    fleet.edit_agent_config("van-1", lambda d: d.update(api={"tcp_port": port}))
    token = fleet.cli("agent", "token", "add", "kiosk", "--write", "*", "--config",
                      str(path)).stdout.splitlines()[0]
    fleet.start_agent("van-1")
    fleet.wait_drained("van-1")
    fleet.stop_server()
    fleet.agent("van-1").put("tasks", "t-1", {"route": S})
    fleet.wait(lambda: "server unavailable since" in str(_api_status(port, token)["summary"])
               or None, 30, what="the API says the server is unavailable")

    # Ages tick between the three reads (each CLI run takes a while): compare the rest.
    api_doc, json_doc = _api_status(port, token), fleet.agent_status("van-1")
    # One document: the API had no `client_cert`, the command no `sync_running`.
    assert set(api_doc) == set(json_doc), set(api_doc) ^ set(json_doc)
    assert api_doc["sync_running"] is json_doc["sync_running"] is True
    api = _ages(str(api_doc["summary"]))
    as_json = _ages(json_doc["summary"])
    line = fleet.cli("agent", "status", "--config", str(path)).stdout.splitlines()[0]
    assert api == as_json == _ages(line), (api, as_json, line)
    assert line.startswith("online, 1 pending (oldest ")
    assert "waiting: server unavailable since" in line
    assert "as last heard" not in line  # connected: heard live

    # The broker goes too: what the agent heard of the servers is no longer live, and
    # the API says so (it read as a fact of now; a stopping Mosquitto even delivers a
    # running server's will first).
    fleet.stop_broker()
    doc = fleet.wait(lambda: d if not (d := _api_status(port, token))["online"] else None,
                     30, what="the API says offline")
    assert str(doc["summary"]).startswith("offline — "), doc["summary"]
    assert ("server unavailable since " in str(doc["summary"]) and "(as last heard before "
            "the link to the broker was lost)" in str(doc["summary"])), doc["summary"]
    fleet.start_broker()
    fleet.start_server()
    fleet.wait_drained("van-1")


def test_a_restarted_agent_that_cannot_connect_says_why(fleet: Fleet) -> None:
    """The agent ran, stopped, and starts again with the broker down: its new sync
    process never connects (the heartbeat still names the old, dead one), yet it runs
    and retries: status gives the connection problem, not "the sync process does not
    run"."""
    path = fleet.add_device("van-1", [S])
    fleet.start_agent("van-1")
    fleet.wait(lambda: fleet.agent_status("van-1")["online"] or None, 60, what="online")
    assert fleet.stop_agent("van-1") == 0
    fleet.stop_broker()
    fleet.start_agent("van-1", wait=False)
    fleet.agents["van-1"].wait_event("link_problem")
    def refused() -> dict[str, object] | None:
        st = fleet.agent_status("van-1")
        return st if (st.get("link") or {}).get("code") == "connection_refused" else None

    status = fleet.wait(refused, 60, what="status says nothing listens")
    assert status["agent_running"] is True and status["online"] is False
    assert "is the broker running" in status["summary"]
    assert "sync process does not" not in status["summary"]
    text = fleet.cli("agent", "status", "--config", str(path)).stdout
    assert "last connection attempt: connection_refused" in text
    fleet.start_broker()
    fleet.wait(lambda: fleet.agent_status("van-1")["online"] or None, 60, what="online")
