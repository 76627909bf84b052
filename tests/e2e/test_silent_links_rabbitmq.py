"""The merge server's AMQP link to RabbitMQ goes silent: packets vanish, no reset, no FIN
(a cut cable, a firewall that drops, a host powered off). The server runs in a network
namespace of the test's own and reaches its one RabbitMQ node through a veth pair whose
host end the test takes down (tests/silent_link.py); the device reaches RabbitMQ's MQTT
listener directly, so it keeps writing into the up queue meanwhile. What must hold:

- the server notices within its AMQP heartbeat (pika closes a connection that received
  nothing for `heartbeat_s` + 5 s), logs why, and `server status` says it runs but is
  not connected to the broker (pointing at `[amqp] nodes`, not at `[mqtt]`);
- what it took from the queue before the cut it still applies, but its acknowledgements
  vanish with the link: RabbitMQ takes those messages back (its own heartbeat closes the
  connection) and hands them out again once the server reconnects;
- once the link is back the server reconnects by itself, and every change, written
  before, during or after the silence, is applied exactly once: counter totals exact,
  one outcome per change id, gapless sequences per scope (a redelivered message, or a
  device's resend, is answered as a duplicate);
- with a second node in `[amqp] nodes` and the path to the first silent for good, the
  server moves to the second by itself, with the same exactness.

The heartbeat is 2 s here (the config allows 1..600; 30 by default) to keep the test
short: the mechanism is the one the product uses with its default.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.rabbit_fleet import RabbitFleet
from tests.e2e.test_multiserver import Ledger, check_exact, check_sequences, increment
from tests.rabbitmq_cluster import RabbitCluster, running_cluster
from tests.silent_link import SilentLink, silent_link

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.rabbitmq]

HEARTBEAT_S = 2
WINDOW_MS = 300
SCOPES = ("depot-1", "depot-2")
BURST = 150            # increments in flight when the link is cut
DURING = 40            # increments written while the link is silent
SMALL_BATCHES = {"batch_max_changes": 2, "max_inflight_changes": 40}
"""Many small up messages, so that the server holds some it took but has not settled."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """One RabbitMQ node (the link, not clustering, is under test)."""
    yield from running_cluster(tmp_path_factory.mktemp("rabbit"), size=1)


class SilentAmqpFleet(RabbitFleet):
    """A RabbitFleet whose one server (LMDB store) runs in the links' namespace and reaches
    RabbitMQ's AMQP listener only through them (`[amqp] nodes`: one per link, in
    order), with a short heartbeat."""

    def __init__(self, root: Path, cluster: RabbitCluster, *links: SilentLink) -> None:
        self.links = links
        self.link = links[0]
        super().__init__(root, cluster, None, metrics=False)
        proc = self.servers["server-1"]
        proc.argv = ["ip", "netns", "exec", self.link.namespace, *proc.argv]

    def _write_server_config(self, server_id: str) -> None:
        self.node_orders[server_id] = [0]
        super()._write_server_config(server_id)
        path = self.server_configs[server_id]
        text = path.read_text()
        direct = f"nodes = {json.dumps([f'127.0.0.1:{self.cluster.amqp_port(0)}'])}\n"
        assert direct in text, text
        through = json.dumps([f"{link.address}:{link.port}" for link in self.links])
        text = text.replace(direct, f"nodes = {through}\nheartbeat_s = {HEARTBEAT_S}\n")
        # Groups gathered for a while: at the cut the server holds messages it took
        # from the queue and has not applied yet; it applies them, and their acks vanish.
        path.write_text(text.replace("[amqp]\n", f"[merge]\nbatch_window_ms = {WINDOW_MS}\n"
                                                  "[amqp]\n"))


@pytest.fixture
def fleet(tmp_path: Path, cluster: RabbitCluster) -> Iterator[SilentAmqpFleet]:
    cluster.ensure_ready()
    with silent_link(cluster.amqp_port(0)) as link, \
            SilentAmqpFleet(tmp_path, cluster, link) as f:
        f.start()
        yield f


@pytest.fixture
def two_paths(tmp_path: Path, cluster: RabbitCluster) -> Iterator[SilentAmqpFleet]:
    """The server with two `[amqp] nodes`, each a path of its own out of its namespace
    (both to the one RabbitMQ node: the server's failover is under test, not the
    cluster's, which test_rabbitmq_cluster.py kills nodes of)."""
    cluster.ensure_ready()
    with silent_link(cluster.amqp_port(0)) as first, \
            silent_link(cluster.amqp_port(0), namespace=first.namespace) as second, \
            SilentAmqpFleet(tmp_path, cluster, first, second) as f:
        f.start()
        yield f


def _status(fleet: RabbitFleet) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fleet.cli("server", "status", "--json", "--config",
                                               str(fleet.server_config)).stdout)
    return doc


def _applied(fleet: RabbitFleet) -> int:
    return sum(fleet.scope_seq(s) for s in SCOPES)


def test_a_silent_amqp_link_is_noticed_healed_and_applied_exactly_once(
        fleet: SilentAmqpFleet) -> None:
    """Cut mid-stream: noticed by the heartbeat, said by status and log; healed: the
    server reconnects and every change is applied exactly once."""
    link, server = fleet.link, fleet.servers["server-1"]
    ledger = Ledger()
    fleet.add_device("van-1", list(SCOPES), sync=SMALL_BATCHES)
    fleet.start_agent("van-1")
    for i in range(BURST):
        increment(fleet, ledger, "van-1", SCOPES[i % 2], i % 3, 1)
    fleet.wait(lambda: _applied(fleet) >= 20, 60, what="the burst being applied",
               interval=0.005)

    link.cut()
    cut_at = time.monotonic()
    at_cut = _applied(fleet)
    for i in range(DURING):
        increment(fleet, ledger, "van-1", SCOPES[i % 2], 3 + i % 2, 2)
    down = server.wait_event("amqp_disconnected", timeout=4 * (HEARTBEAT_S + 5))
    noticed_s = time.monotonic() - cut_at
    after_cut = _applied(fleet) - at_cut  # applied from what it held: acks lost
    assert fleet.pending("van-1") > 0
    # The reason is in the log: the heartbeat, not a guess.
    failed = server.events("amqp_connection_failed")
    assert "heartbeat" in down["reason"].lower(), down
    assert any("heartbeat" in e["reason"].lower() for e in failed), failed
    fleet.wait(lambda: _status(fleet)["server_connected"] is False, 30,
               what="server status says the server lost its broker")
    [row] = _status(fleet)["servers"]
    assert row["state"] == "running" and row["broker_connected"] is False, row
    text = fleet.cli("server", "status", "--config", str(fleet.server_config)).stdout
    assert "NOT CONNECTED TO THE BROKER since" in text, text
    assert "[amqp] nodes" in text and "amqp_connection_failed" in text, text

    # Each failed attempt to reconnect says why, in the server's own event, once; pika's
    # per-attempt error lines (seven, one with a traceback) are not repeated beside it.
    fleet.wait(lambda: len(server.events("amqp_connection_failed")) >= 2, 30,
               what="a reconnect attempt failed through the silent link")
    reasons = [e["reason"] for e in server.events("amqp_connection_failed")]
    assert all(": " in r for r in reasons), reasons
    assert not [e for e in server.events() if str(e.get("logger", "")).startswith("pika")], \
        server.output()

    link.heal()
    healed_at = time.monotonic()
    fleet.wait(lambda: len(server.events("amqp_connected")) >= 2, 60,
               what="the server reconnects once the link is back")
    recovered_s = time.monotonic() - healed_at
    fleet.wait_drained("van-1", timeout=60)
    drained_s = time.monotonic() - healed_at
    check_exact(fleet, ledger)
    check_sequences(fleet, ledger)
    fleet.wait(lambda: _status(fleet)["server_connected"] is True, 30,
               what="server status says it is connected again")
    print(f"\nAMQP link silent: noticed after {noticed_s:.1f} s (heartbeat {HEARTBEAT_S} s), "
          f"{after_cut} changes applied after the cut (acks lost), reconnected "
          f"{recovered_s:.1f} s and drained {drained_s:.1f} s after the heal; "
          f"{ledger.changes} changes applied exactly once")
    assert noticed_s < 3 * (HEARTBEAT_S + 5), noticed_s


def test_a_silent_node_link_fails_over_to_the_next_node(two_paths: SilentAmqpFleet) -> None:
    """The path to the first node goes silent and stays so: the server notices by its
    heartbeat and moves to the next node of `[amqp] nodes`; every change is applied
    exactly once (what it held from the first is redelivered through the second)."""
    fleet = two_paths
    first, second = fleet.links
    server = fleet.servers["server-1"]
    assert server.events("amqp_connected")[0]["node"] == f"{first.address}:{first.port}"
    ledger = Ledger()
    fleet.add_device("van-1", list(SCOPES), sync=SMALL_BATCHES)
    fleet.start_agent("van-1")
    for i in range(BURST):
        increment(fleet, ledger, "van-1", SCOPES[i % 2], i % 3, 1)
    fleet.wait(lambda: _applied(fleet) >= 20, 60, what="the burst being applied",
               interval=0.005)

    first.cut()
    cut_at = time.monotonic()
    at_cut = _applied(fleet)
    for i in range(DURING):
        increment(fleet, ledger, "van-1", SCOPES[i % 2], 3 + i % 2, 2)
    moved = f"{second.address}:{second.port}"
    fleet.wait(lambda: [e for e in server.events("amqp_connected") if e["node"] == moved],
               4 * (HEARTBEAT_S + 5), what="the server moves to the next node")
    moved_s = time.monotonic() - cut_at
    failed = server.events("amqp_connection_failed")
    assert any("heartbeat" in e["reason"].lower() for e in failed), failed
    fleet.wait_drained("van-1", timeout=60)
    drained_s = time.monotonic() - cut_at
    check_exact(fleet, ledger)
    check_sequences(fleet, ledger)
    fleet.wait(lambda: _status(fleet)["server_connected"] is True, 30,
               what="server status says it is connected (through the next node)")
    print(f"\nAMQP path to node 1 silent: on node 2 after {moved_s:.1f} s (heartbeat "
          f"{HEARTBEAT_S} s), drained {drained_s:.1f} s after the cut; {at_cut} applied "
          f"at the cut, {ledger.changes} changes applied exactly once")
    assert moved_s < 3 * (HEARTBEAT_S + 5), moved_s
