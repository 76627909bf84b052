"""The retained messages a broker replays on a subscription are never older than what
the subscriber already got live on the same topic: Mosquitto by design, the embedded
broker since fix 15 of `broker.embedded.amqtt_broker`.

amqtt took a copy of its retained messages when a subscription started and sent them
one by one, checking the ACL for each (an await); a message published on one of those
topics meanwhile went to the subscriber live, and then the copy's older message went
after it, flagged retained. The merge server reads a replayed status as the device's
latest (broker.server.intake.fair), so a device's stale last will ("offline") replayed
after its fresh "online" left it offline at the server, which sent it no deltas while it
sat connected, asking for nothing (so not deaf to agent.daemon_deaf): the changes
merged meanwhile never reached it (tests/e2e/test_fault_pairs_frozen.py, the broker
frozen and resumed, the server's subscription and the device's status racing)."""

from __future__ import annotations

from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until

STATUS = f"{PREFIX}/van-12/status"
OTHERS = 2000
"""Retained statuses of other devices replayed with it: the replay takes long enough for
a publish to land in the middle of it."""



def _connect(made: list[RecordingClient], broker: BrokerProcess, client_id: str,
             user: str) -> RecordingClient:
    client = RecordingClient(broker.port, client_id, user, USERS[user])
    made.append(client)
    assert client.connect() == "Success"
    return client


def test_a_status_published_during_the_replay_is_the_last_one_heard(
        any_broker: BrokerProcess, clients: list[RecordingClient]) -> None:
    """The device's "off" is retained (its will, last of many statuses); the server
    subscribes, and while the broker replays the statuses the device says "on": the
    server hears "on" last, live or replayed, never the replayed "off" after it."""
    other_server = _connect(clients, any_broker, "merge-2", SERVER_USER)
    for i in range(OTHERS):
        other_server.client.publish(f"{PREFIX}/dev-{i:04d}/status", b"on", qos=1,
                                    retain=True)
    other_server.publish(STATUS, b"off", retain=True)  # inserted last: replayed last
    probe = _connect(clients, any_broker, "merge-3", SERVER_USER)
    assert probe.subscribe(STATUS) == 1
    probe.wait_for(STATUS, b"off")  # routed in order: every other status is retained too
    device = _connect(clients, any_broker, "van-12", "van-12")
    server = _connect(clients, any_broker, "merge-1", SERVER_USER)
    assert server.subscribe(f"{PREFIX}/+/status") == 1  # the replay starts
    device.publish(STATUS, b"on", retain=True)
    wait_until(lambda: len(server.received()) >= OTHERS + 2, 30,
               message="the replay and the live status heard")
    last = server.received(STATUS)[-1]
    assert last.payload == b"on", [(m.payload, m.retain) for m in server.received(STATUS)]
    # A subscriber that comes later is replayed the device's latest status.
    late = _connect(clients, any_broker, "merge-4", SERVER_USER)
    assert late.subscribe(STATUS) == 1
    assert late.wait_for(STATUS).payload == b"on"
