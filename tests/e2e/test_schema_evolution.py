"""Issue 10 §1 end to end, on both fleets: a device offline across three published
schema versions (a field added, a field renamed, a type changed) comes back and syncs
with no dead letter and no re-download; agents one and three versions behind keep
syncing against the newer server, receiving records in their own version's shape."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.api import Agent
from schemas.collection import Catalog, parse_catalog
from tests.e2e.fleet import Fleet
from tests.schema_versions import V1, V2, V3, V4

pytestmark = pytest.mark.e2e
TEXTS = {1: V1, 2: V2, 3: V3, 4: V4}


def catalog(version: int) -> Catalog:
    return parse_catalog(tomllib.loads(TEXTS[version]), f"v{version}")


@pytest.fixture
def stores() -> Iterator[dict[str, Agent]]:
    """Device stores opened by the test with the schema version each device runs."""
    opened: dict[str, Agent] = {}
    yield opened
    for ag in opened.values():
        ag.close()


def use_schema(fleet: Fleet, dev: str, path: Path) -> None:
    """Run the schema file `path`, upgraded by hand only: the device does not take
    versions from the server (sync.schema_push = false; that path: test_schema_push)."""
    def edit(data: dict[str, Any]) -> None:
        data.update(schema_file=str(path))
        data.setdefault("sync", {})["schema_push"] = False

    fleet.edit_agent_config(dev, edit)


def server_runs(fleet: Fleet, path: Path) -> None:
    """Point the server config at `path` and restart the server."""
    text = fleet.server_config.read_text()
    text = re.sub(r"(?m)^schema_file = .*\n", "", text)
    fleet.server_config.write_text(f"schema_file = {str(path)!r}\n" + text)
    fleet.stop_server()
    fleet.start_server()


def test_device_offline_across_three_schema_versions(fleet: Fleet, tmp_path: Path,
                                                     stores: dict[str, Agent]) -> None:
    files = {}
    for version, text in TEXTS.items():
        files[version] = tmp_path / f"fleet-v{version}.toml"
        files[version].write_text(text)
    fleet.cli("schema", "publish", str(files[1]), "--config", str(fleet.server_config))

    # van-old writes under version 1 while offline, and stays offline throughout.
    fleet.add_device("van-old", ["r1"])
    use_schema(fleet, "van-old", files[1])
    old = stores["van-old"] = Agent.open(fleet.agent_config("van-old"), catalog(1), env={})
    old.put("tasks", "t-old", {"route": "r1", "notes": "ring twice", "eta": 1764000000001})
    old.put("tasks", "t-old", {"status": "out"})

    # The fleet moves on: versions 2, 3 and 4 are published and the server runs 4.
    for version in (2, 3, 4):
        fleet.cli("schema", "publish", str(files[version]), "--config", str(fleet.server_config))
    history = fleet.cli("schema", "history", "--config", str(fleet.server_config)).stdout
    assert re.search(r"(?m)^4\s+\S+\s+\d+\s+LIVE\s", history), history
    server_runs(fleet, files[4])

    # A device on version 4 and one on version 3 (one behind) write.
    fleet.add_device("van-new", ["r1"])
    use_schema(fleet, "van-new", files[4])
    fleet.add_device("van-3", ["r1"])
    use_schema(fleet, "van-3", files[3])
    new = stores["van-new"] = Agent.open(fleet.agent_config("van-new"), catalog(4), env={})
    v3 = stores["van-3"] = Agent.open(fleet.agent_config("van-3"), catalog(3), env={})
    new.put("tasks", "t-new", {"route": "r1", "note": "gate 12", "eta": "tomorrow 9:00"})
    v3.put("tasks", "t-3", {"route": "r1", "note": "side door", "eta": 42, "floor": 2})
    fleet.start_agents("van-new", "van-3")
    fleet.wait(lambda: (not new.status().pending and not v3.status().pending) or None,
               what="van-new and van-3 drained")
    assert fleet.value("tasks", "t-3", "eta") == "42"
    assert fleet.value("tasks", "t-3", "note") == "side door"

    # van-old comes back, still on version 1.
    fleet.start_agent("van-old")
    fleet.wait(lambda: not old.status().pending or None, timeout=60,
               what="van-old drained")
    rec = fleet.record("tasks", "t-old")
    assert rec is not None
    assert rec["f"]["note"] == "ring twice" and rec["f"]["eta"] == "1764000000001"
    assert rec["f"]["status"] == "out" and "notes" not in rec["f"]
    assert old.dead_letters() == [] and v3.dead_letters() == []
    assert fleet.server_dead_letters() == []

    # Each device sees the others' records in its own version's names and types.
    def seen(ag: Agent, key: str, name: str) -> object:
        r = ag.get("tasks", key)
        return None if r is None else r.fields.get(name)

    fleet.wait(lambda: seen(old, "t-new", "notes") == "gate 12" or None,
               what="van-old has t-new projected to version 1")
    assert seen(old, "t-3", "notes") == "side door" and seen(old, "t-3", "eta") == 42
    assert seen(old, "t-new", "eta") is None  # "tomorrow 9:00" is no int: left out
    fleet.wait(lambda: seen(v3, "t-old", "note") == "ring twice" or None,
               what="van-3 has t-old in version 3's names")
    assert seen(v3, "t-old", "eta") == 1764000000001
    fleet.wait(lambda: seen(new, "t-old", "eta") == "1764000000001" or None,
               what="van-new has t-old in version 4's types")

    # No re-download: no device's scope went back to a snapshot.
    for dev, ag in (("van-old", old), ("van-3", v3), ("van-new", new)):
        assert ag.status().snapshots == [], dev
        assert "snapshot_dropped_records" not in fleet.agents[dev].output(), dev


def test_too_old_device_waits_for_its_upgrade_then_syncs(fleet: Fleet, tmp_path: Path,
                                                         stores: dict[str, Agent]) -> None:
    files = {}
    for version, text in TEXTS.items():
        files[version] = tmp_path / f"fleet-v{version}.toml"
        files[version].write_text(text)
    for version in (2, 3, 4):  # the history starts at version 2: version 1 is too old
        fleet.cli("schema", "publish", str(files[version]), "--config", str(fleet.server_config))
    server_runs(fleet, files[4])

    fleet.add_device("van-old", ["r1"])
    use_schema(fleet, "van-old", files[1])
    old = stores["van-old"] = Agent.open(fleet.agent_config("van-old"), catalog(1), env={})
    old.put("tasks", "t-old", {"route": "r1", "notes": "written on v1", "eta": 7})
    fleet.start_agent("van-old")

    def told() -> dict[str, object] | None:
        status = fleet.agent_status("van-old")
        err = status.get("last_error") or {}
        return status if err.get("code") == "schema_version" else None

    status = fleet.wait(told, what="van-old told it needs an upgrade")
    assert "upgrade needed" in str(status["summary"]) and status["pending"] == 1
    assert fleet.record("tasks", "t-old") is None  # nothing applied, nothing refused
    assert old.dead_letters() == [] and fleet.server_dead_letters() == []

    # The operator upgrades the device to version 2 (still one behind the server's 4).
    fleet.close_agents()
    stores.clear()
    fleet.stop_agent("van-old")
    use_schema(fleet, "van-old", files[2])
    fleet.start_agent("van-old")
    new = stores["van-old"] = Agent.open(fleet.agent_config("van-old"), catalog(2), env={})
    fleet.wait(lambda: not new.status().pending or None, what="van-old drained")
    rec = fleet.record("tasks", "t-old")
    assert rec is not None
    assert rec["f"]["note"] == "written on v1" and rec["f"]["eta"] == "7"
    assert new.dead_letters() == [] and fleet.server_dead_letters() == []
    assert fleet.wait(lambda: (fleet.agent_status("van-old").get("last_error") is None)
                      or None, what="van-old no longer told to upgrade")
