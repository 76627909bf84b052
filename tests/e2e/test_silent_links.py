"""Links that go silent rather than break: the agent daemon runs in a network namespace
of the test's own and reaches the broker through a veth pair whose host end the test
takes down (tests/silent_link.py). No reset, no FIN arrives: packets vanish, as behind
a dead cellular cell or a firewall that drops. What must hold:

- the agent notices within its keepalive (5 s here: a PINGREQ goes unanswered) and
  `agent status` says offline, with the write made meanwhile saved and pending;
- the broker notices too (its keepalive) and publishes the device's last will: the
  server shows it offline;
- once the link is back, the agent reconnects by itself and the write arrives once;
- between the merge server and the broker: the server's will holds the devices, and
  `server status` says the server runs but is not connected to the broker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.fleet import Fleet
from tests.silent_link import SilentLink, silent_link

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEEPALIVE_S = 5


@pytest.fixture
def link(fleet: Fleet) -> Iterator[SilentLink]:
    """A silent link to the fleet's broker; whatever the test started in its namespace
    (an agent, the server) is stopped while the link still exists."""
    with silent_link(fleet.port) as made:
        yield made
        fleet.close_agents()
        fleet.stop_server()


def _server_status(fleet: Fleet) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fleet.cli("server", "status", "--json", "--config",
                                               str(fleet.server_config)).stdout)
    return doc


def _server_online(fleet: Fleet, dev: str) -> bool:
    rows = json.loads(fleet.cli("server", "devices", "--json", "--config",
                                str(fleet.server_config)).stdout)
    return bool(next(r for r in rows if r["id"] == dev)["online"])


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_a_silent_broker_link_is_noticed_and_drained_once_back(
        fleet: Fleet, link: SilentLink) -> None:
    fleet.add_device("van-1", ["depot-7"])

    def through_link(data: dict[str, object]) -> None:
        mqtt = data["mqtt"]
        assert isinstance(mqtt, dict)
        mqtt.update(host=link.address, port=link.port, keepalive_s=KEEPALIVE_S)

    fleet.edit_agent_config("van-1", through_link)
    proc = fleet.agents["van-1"]
    proc.argv = ["ip", "netns", "exec", link.namespace, *proc.argv]
    fleet.start_agent("van-1")
    ag = fleet.agent("van-1")
    ag.put("inventory", "sku-1", {"depot": "depot-7", "name": "Bread flour"})
    fleet.wait_drained("van-1")
    fleet.wait_agent_status("van-1", lambda st: st["online"], 30, what="online")
    fleet.wait(lambda: _server_online(fleet, "van-1"), 30, what="server shows it online")

    link.cut()
    cut_at = time.monotonic()
    ag.put("inventory", "sku-2", {"depot": "depot-7", "name": "Rye"})
    fleet.wait_agent_status("van-1", lambda st: not st["online"], 6 * KEEPALIVE_S,
                            what="agent status says offline after the link went silent")
    noticed_s = time.monotonic() - cut_at
    st = fleet.agent_status("van-1")
    assert st["pending"] == 1 and "offline" in st["summary"], st
    assert fleet.record("inventory", "sku-2") is None
    fleet.wait(lambda: not _server_online(fleet, "van-1"), 6 * KEEPALIVE_S,
               what="the broker's keepalive publishes the last will: server shows offline")
    assert noticed_s < 4 * KEEPALIVE_S, noticed_s

    link.heal()
    fleet.wait_drained("van-1", timeout=90)
    assert fleet.value("inventory", "sku-2", "name") == "Rye"
    fleet.wait_agent_status("van-1", lambda st: st["online"], 30, what="online again")
    fleet.wait(lambda: _server_online(fleet, "van-1"), 30, what="server shows it online again")


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_a_silent_link_between_server_and_broker(fleet: Fleet, link: SilentLink) -> None:
    """The merge server's link to the broker goes silent: the broker publishes the
    server's last will, so devices hold their changes and say "server unavailable"
    instead of filling a queue nobody reads; the server notices by its own keepalive and
    reconnects once the link is back; everything written meanwhile arrives once."""
    fleet.stop_server()
    config = fleet.server_config.read_text()
    direct = f'host = "127.0.0.1"\nport = {fleet.port}\n'
    assert direct in config
    fleet.server_config.write_text(config.replace(
        direct, f'host = "{link.address}"\nport = {link.port}\nkeepalive_s = {KEEPALIVE_S}\n'))
    proc = fleet.servers["server-1"]
    proc.argv = ["ip", "netns", "exec", link.namespace, *proc.argv]
    fleet.start_server()

    fleet.add_device("van-1", ["depot-7"])
    fleet.start_agent("van-1")
    ag = fleet.agent("van-1")
    ag.put("inventory", "sku-1", {"depot": "depot-7", "name": "Bread flour"})
    fleet.wait_drained("van-1")
    fleet.wait(lambda: (ag.status().server or {}).get("up") is True, 30,
               what="the server group is announced up")

    link.cut()
    # Sent at once (the server still counts as up): the broker hands it to a connection
    # that answers nothing. It stays in the outbox until the server's ack, however long.
    ag.put("inventory", "sku-1b", {"depot": "depot-7", "name": "Spelt"})
    fleet.wait(lambda: "server_unavailable" in [d["code"] for d in ag.status().deferred],
               6 * KEEPALIVE_S, what="the server's will: the agent holds, status says why")
    assert "server unavailable since" in ag.status().summary()
    ag.put("inventory", "sku-2", {"depot": "depot-7", "name": "Rye"})
    assert ag.status().pending == 2
    proc.wait_event("mqtt disconnected", timeout=6 * KEEPALIVE_S)  # its own keepalive
    assert fleet.record("inventory", "sku-2") is None
    # The operator is told: running, but cut off from the broker (not just "running").
    fleet.wait(lambda: _server_status(fleet)["server_connected"] is False, 30,
               what="server status says the server lost its broker")
    doc = _server_status(fleet)
    assert doc["server_running"] is True and doc["presence_as_of"] is not None
    [server] = doc["servers"]
    assert server["broker_connected"] is False and server["broker_down_since"]
    text = fleet.cli("server", "status", "--config", str(fleet.server_config)).stdout
    assert "NOT CONNECTED TO THE BROKER since" in text
    assert "NO MERGE SERVER IS CONNECTED TO THE BROKER" in text

    link.heal()
    fleet.wait_drained("van-1", timeout=90)
    assert fleet.value("inventory", "sku-2", "name") == "Rye"
    assert fleet.value("inventory", "sku-1b", "name") == "Spelt"
    fleet.wait(lambda: ag.status().deferred == [], 30, what="no deferral once it is back")
    fleet.wait(lambda: _server_status(fleet)["server_connected"] is True, 30,
               what="server status says it is connected again")
    assert "NOT CONNECTED" not in fleet.cli("server", "status", "--config",
                                            str(fleet.server_config)).stdout
