"""Issue 10 §1, schema versions reach devices over the protocol (capability
`schema_push`, PROTOCOL.md §7.13), end to end on both fleets: a running server follows
`schema publish` / `rollback` without a restart; a device offline across two versions
takes them when it reconnects and syncs what it wrote meanwhile; one online takes a
version as it is published; a rollback takes it back; a hostile `schema` message is
refused with no change."""

from __future__ import annotations

import tomllib
from pathlib import Path

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.collection import Catalog, parse_catalog
from tests.e2e.fleet import SERVER_USER, Fleet
from tests.schema_versions import V1, V2, V3, V4

pytestmark = pytest.mark.e2e
TEXTS = {1: V1, 2: V2, 3: V3, 4: V4}


def catalog(version: int) -> Catalog:
    return parse_catalog(tomllib.loads(TEXTS[version]), f"v{version}")


def publish(fleet: Fleet, tmp_path: Path, version: int) -> None:
    path = tmp_path / f"fleet-v{version}.toml"
    path.write_text(TEXTS[version])
    fleet.cli("schema", "publish", str(path), "--config", str(fleet.server_config))


def runs(fleet: Fleet, dev: str, version: int) -> bool | None:
    """True once the device's store runs `version` (read in this process, which
    follows the daemon's switch at its next transaction)."""
    return fleet.agent(dev).status().schema_version == version or None


def test_devices_take_published_versions_offline_and_online(fleet: Fleet,
                                                            tmp_path: Path) -> None:
    publish(fleet, tmp_path, 1)
    fleet.add_device("van-a", ["r1"])
    fleet.start_agent("van-a")
    ag = fleet.agent("van-a")
    ag.put("tasks", "t-1", {"route": "r1", "notes": "first", "eta": 5})
    fleet.wait_drained("van-a")

    # Offline, the device writes under version 1 while 2 and 3 are published; the server
    # keeps running, and picks both up without a restart.
    fleet.stop_agent("van-a")
    ag.put("tasks", "t-2", {"route": "r1", "notes": "offline", "eta": 6})
    publish(fleet, tmp_path, 2)
    publish(fleet, tmp_path, 3)
    fleet.server.wait_event("schema_reloaded", where=lambda e: e.get("version") == 3)

    fleet.start_agent("van-a")
    fleet.wait(lambda: runs(fleet, "van-a", 3), what="van-a took versions 2 and 3")
    fleet.wait_drained("van-a")
    # One version per step, in order (the log line follows the commit: wait for it).
    fleet.wait(lambda: [e["sv"] for e in fleet.agents["van-a"].events("schema_taken")]
               == [2, 3] or None, what="van-a logged taking 2 then 3")
    assert fleet.value("tasks", "t-2", "note") == "offline"
    t1 = fleet.record("tasks", "t-1")  # stored under 1, rewritten by the publish of 3
    assert t1 is not None and t1["f"]["note"] == "first" and "notes" not in t1["f"]
    assert ag.get("tasks", "t-1").fields["note"] == "first"
    assert ag.get("tasks", "t-2").fields["note"] == "offline"
    assert "notes" not in ag.get("tasks", "t-2").fields
    ag.put("tasks", "t-3", {"route": "r1", "note": "on three"})
    fleet.wait_drained("van-a")
    assert fleet.value("tasks", "t-3", "note") == "on three"

    # Online: version 4 (eta int -> string) is taken as soon as it is published.
    publish(fleet, tmp_path, 4)
    fleet.wait(lambda: runs(fleet, "van-a", 4), what="van-a took version 4 online")
    assert ag.get("tasks", "t-1").fields["eta"] == "5"
    ag.put("tasks", "t-4", {"route": "r1", "eta": "tomorrow"})
    fleet.wait_drained("van-a")
    assert fleet.value("tasks", "t-4", "eta") == "tomorrow"
    assert ag.dead_letters() == [] and fleet.server_dead_letters() == []
    assert ag.status().snapshots == [] and ag.status().last_error is None
    with fleet.store.read() as txn:
        row = txn.get_device("van-a")
    assert row is not None and row.sv == 4


def send_down(fleet: Fleet, dev: str, payload: bytes) -> None:
    """Publish `payload` on the device's down topic as the server's login would (a
    hostile or broken server), and wait for the broker to take it."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id="schema-push-test", protocol=MQTTProtocolVersion.MQTTv311)
    client.username_pw_set(SERVER_USER, fleet.server_password)
    client.connect("127.0.0.1", fleet.port)
    client.loop_start()
    try:
        info = client.publish(f"waystation/{dev}/down", payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()


def test_hostile_schema_is_refused_and_rollback_takes_devices_back(fleet: Fleet,
                                                                   tmp_path: Path) -> None:
    for version in (1, 2, 3):
        publish(fleet, tmp_path, version)
    fleet.add_device("van-b", ["r1"])
    fleet.add_device("van-c", ["r1"])
    fleet.edit_agent_config("van-c", lambda d: d.setdefault("sync", {}).update(
        schema_push=False))
    fleet.start_agents("van-b", "van-c")
    ag = fleet.agent("van-b")
    fleet.wait(lambda: runs(fleet, "van-b", 3), what="van-b took version 3")
    ag.put("tasks", "t-1", {"route": "r1", "note": "kept", "eta": 3})
    fleet.wait_drained("van-b")

    # A breaking version without its migration (eta int -> string) is refused: nothing
    # changes, and the status says why.
    breaking = "version = 4\n" + V3.split('to = "note"\n', 1)[1].replace(
        'eta = { type = "int"', 'eta = { type = "string"')
    send_down(fleet, "van-b", orjson.dumps({"type": "schema", "v": 1, "sv": 4,
                                            "text": breaking}))

    def refused() -> dict[str, object] | None:
        err = fleet.agent_status("van-b").get("last_error") or {}
        return err if err.get("code") == "schema_refused" else None

    err = fleet.wait(refused, what="van-b refused the hostile schema")
    assert "breaking change without a migration" in str(err["reason"])
    assert ag.status().schema_version == 3 and ag.get("tasks", "t-1").fields["eta"] == 3
    ag.put("tasks", "t-2", {"route": "r1", "note": "still syncing"})
    fleet.wait_drained("van-b")

    # The operator rolls 3 back: the online device goes back to 2 (note -> notes).
    fleet.cli("schema", "rollback", "--config", str(fleet.server_config))
    fleet.wait(lambda: runs(fleet, "van-b", 2), what="van-b went back to version 2")
    t1 = ag.get("tasks", "t-1").fields
    assert t1["notes"] == "kept" and "note" not in t1
    ag.put("tasks", "t-3", {"route": "r1", "notes": "after the rollback"})
    fleet.wait_drained("van-b")
    assert fleet.value("tasks", "t-3", "notes") == "after the rollback"
    assert ag.dead_letters() == []

    # van-c does not take versions from the server: it still runs its file (version 1).
    assert fleet.agent("van-c").status().schema_version == 1
    assert fleet.agents["van-c"].events("schema_taken") == []
