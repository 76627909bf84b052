"""Hostile devices on the `status` topics (PROTOCOL.md §1, §7.10), through the real
brokers: one device flooding its own status with good and bad reports, retained or
not, while another device syncs; and one device forging another's status (a publish, a
retained publish and a last will on the victim's topic), which the broker's ACL must
drop before the server ever reads it, also across a server restart (retained replay)."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest

from tests.e2e.fleet import SERVER_USER, Fleet
from tests.e2e.protocol_device import ProtocolDevice
from tests.helpers import RecordingClient

pytestmark = pytest.mark.e2e

SCOPE = "depot-7"
DAY_MS = 86_400_000


def _status(dev: str, **fields: Any) -> bytes:
    return orjson.dumps({"type": "status", "v": 1, "dev": dev, "on": True, **fields})


def _devices(fleet: Fleet) -> dict[str, dict[str, Any]]:
    out = fleet.cli("server", "devices", "--json", "--config", str(fleet.server_config)).stdout
    return {d["id"]: d for d in json.loads(out)}


def _iso_ms(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def _wait_handled(fleet: Fleet, pd: ProtocolDevice) -> None:
    """Until a catch-up sent after everything else is answered: the device's messages
    of both topics wait in one FIFO queue at the server, so all were handled."""
    fleet.wait(pd.catchup_answered, 120, what=f"{pd.dev}'s catch-up answered")


def test_a_status_flood_is_bounded_and_shows_nothing_absurd(fleet: Fleet) -> None:
    """4,000 statuses from one device (flapping, counts up to 2^53-1, times in 1970 and
    far in the future, invalid ones of every kind, some over 4 KiB, some retained) while
    another device writes 20 times: all 20 are merged; the flooder ends as its last good
    status says (sent from a clock at 1970), with no time shown later than now nor from
    before the device was enrolled; its refusals leave at
    most the first few dead letters per code and a few presence log events."""
    fleet.add_device("van-1", [SCOPE])
    fleet.add_device("pd-flood", [SCOPE])
    fleet.start_agent("van-1")
    van = fleet.agent("van-1")
    van.put("inventory", "sku-1", {"depot": SCOPE, "sku": "sku-1"})
    fleet.wait_drained("van-1")
    pd = ProtocolDevice("pd-flood", fleet.passwords["pd-flood"], port=fleet.port,
                        scopes=[SCOPE])
    assert pd.connect() == "Success", fleet.broker_log_tail()
    pd.hello()
    now = int(time.time() * 1000)
    good = [_status("pd-flood", on=i % 2 == 0, pend=p, t=t)
            for i, (p, t) in enumerate([(0, 1), (2**53 - 1, now + 1000 * DAY_MS),
                                        (5, 0), (7, now)] * 250)]
    bad = [_status("pd-flood", pend=-1), _status("pd-flood", pend=10**18),
           _status("pd-flood", pend=1.5), _status("pd-flood", t=-1),
           _status("pd-flood", agent="x" * 64, pad="y" * 100_000), b"\xff\xfe",
           _status("van-1", on=False, pend=99)] * 400
    started = time.monotonic()
    infos = []
    for i, payload in enumerate(good + bad):
        infos.append(pd.client.publish(pd.status_topic, payload, qos=1, retain=i % 3 == 0))
        if i % 400 == 0:
            van.increment("inventory", "sku-1", "stock", 1)
    for _ in range(10):
        van.increment("inventory", "sku-1", "stock", 1)
    pd.wait(lambda: all(i.is_published() for i in infos) or not pd.connected, 120,
            "the broker taking the flood")
    assert pd.connected
    # The flood handled first: until then the server may drop what the device sends
    # over its share (§10.1: its quota is full of 100 kB statuses), a good status too.
    _wait_handled(fleet, pd)
    # The last good one from a clock that reads 1970 (no real-time clock yet).
    pd.publish(pd.status_topic, _status("pd-flood", pend=3, t=1), retain=True)
    _wait_handled(fleet, pd)
    fleet.wait_drained("van-1", timeout=120)
    elapsed = time.monotonic() - started
    assert fleet.value("inventory", "sku-1", "stock") == 20

    fleet.wait(lambda: _devices(fleet)["pd-flood"]["pending"] == 3, 30,
               what="the last good status in the store (next tick)")
    later = int(time.time() * 1000)
    doc = _devices(fleet)["pd-flood"]
    assert doc["online"] is True and doc["pending"] == 3, doc
    created = _iso_ms(doc["created"])
    for name in ("last_seen", "pending_reported"):
        assert created - 300_000 <= _iso_ms(doc[name]) <= later, (name, doc)
    victim = _devices(fleet)["van-1"]
    assert victim["pending"] != 99 and victim["online"] is True, victim  # never its report

    letters = [d for d in fleet.server_dead_letters() if d["device"] == "pd-flood"]
    by_code: dict[str, int] = {}
    for d in letters:
        by_code[d["code"]] = by_code.get(d["code"], 0) + 1
    assert set(by_code) == {"invalid", "too_large", "malformed", "wrong_device"}, by_code
    assert all(n <= 11 for n in by_code.values()), by_code
    server = fleet.servers["server-1"]
    assert server.running
    presence = [e for e in server.events("presence") if e.get("dev") == "pd-flood"]
    assert len(presence) <= 3 * (elapsed + 2), (len(presence), elapsed)
    pd.close()


def test_a_status_on_another_devices_topic_never_reaches_the_server(fleet: Fleet) -> None:
    """pd-evil publishes on pd-victim's status topic (plain, retained, garbage, and as
    its last will) saying pd-victim is offline with 999 pending: the broker's ACL drops
    all of it, so a subscriber there sees only pd-victim's own statuses, the retained one
    (what a restarted server is replayed) stays pd-victim's, and the server keeps
    pd-victim online with its own count and no dead letter naming it."""
    fleet.add_device("pd-victim", [SCOPE])
    fleet.add_device("pd-evil", [SCOPE])
    topic = "waystation/pd-victim/status"
    victim = ProtocolDevice("pd-victim", fleet.passwords["pd-victim"], port=fleet.port,
                            scopes=[SCOPE])
    assert victim.connect() == "Success", fleet.broker_log_tail()
    own = _status("pd-victim", pend=2, t=int(time.time() * 1000))
    victim.publish(topic, own, retain=True)
    watcher = RecordingClient(fleet.port, "watcher-1", SERVER_USER, fleet.server_password)
    assert watcher.connect() == "Success"
    assert watcher.subscribe(topic) == 1
    watcher.wait_for(topic, own)

    evil = ProtocolDevice("pd-evil", fleet.passwords["pd-evil"], port=fleet.port,
                          scopes=[SCOPE])
    assert evil.connect() == "Success", fleet.broker_log_tail()
    forged = _status("pd-victim", on=False, pend=999, t=int(time.time() * 1000))
    evil.publish(topic, forged)
    evil.publish(topic, forged, retain=True)
    evil.publish(topic, b"\xff forged garbage", retain=True)
    evil.close()
    # Its last will on the victim's topic: refused at connect (the embedded broker) or
    # dropped when the broker publishes it (Mosquitto).
    willing = RecordingClient(fleet.port, "pd-evil", "pd-evil", fleet.passwords["pd-evil"],
                              will=(topic, forged, True))
    if willing.connect() == "Success":
        willing.abort()
    # Taking its session over: the broker is done with the aborted connection (and its
    # will) before it answers this one.
    assert evil.restart() == "Success"
    marker = _status("pd-victim", pend=2, agent="marker", t=int(time.time() * 1000))
    victim.publish(topic, marker, retain=True)
    watcher.wait_for(topic, marker)
    assert [m.payload for m in watcher.received(topic)] == [own, marker]
    fresh = RecordingClient(fleet.port, "watcher-2", SERVER_USER, fleet.server_password)
    assert fresh.connect() == "Success"
    assert fresh.subscribe(topic) == 1
    assert fresh.wait_for(topic).payload == marker  # the retained one: the victim's

    _wait_handled(fleet, victim)
    fleet.wait(lambda: _devices(fleet)["pd-victim"]["pending"] == 2, 30,
               what="the victim's own count stored")
    row = _devices(fleet)["pd-victim"]
    assert row["online"] is True and row["pending"] == 2, row
    assert not [d for d in fleet.server_dead_letters() if d["device"] == "pd-victim"]
    for client in (watcher, fresh):
        client.close()
    evil.close()
    victim.close()
