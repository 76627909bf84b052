"""Issue 10 §1, publishing while devices write, with real processes: two merge servers
on one PostgreSQL database behind Mosquitto, a device streaming changes under version 2
(the field `notes`) while the operator publishes version 3 (renamed `note`) and then
rolls it back with `waystation schema publish` / `rollback`.

The exact interleavings (a server held between reading its registry and committing,
or inside its merge transaction) are forced deterministically in
tests/server/test_engine_publish_window.py; this test checks the same outcome end to
end under real concurrency: every change acked once, no dead letter, and no stored
record holding the field under both names, or under the name the live version does not
have.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.e2e.protocol_device import ProtocolDevice
from tests.schema_versions import V1, V2, V3
from waystation import merge

pytestmark = [
    pytest.mark.e2e, pytest.mark.mosquitto, pytest.mark.postgres,
    pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed"),
]

BATCHES = 60
PER_BATCH = 10


@pytest.fixture
def fleet(tmp_path: Path, pg_database: str) -> Iterator[Fleet]:
    with Fleet(tmp_path, "mosquitto", "postgres", pg_database) as f:
        f.start(server=False)
        for n, text in enumerate((V1, V2), start=1):
            path = tmp_path / f"fleet-v{n}.toml"
            path.write_text(text)
            f.cli("schema", "publish", str(path), "--config", str(f.server_config))
        f.start_server()
        f.add_server("server-2")
        f.start_server("server-2")
        yield f


def stream(pd: ProtocolDevice, fleet: Fleet, start: int, sv: int, name: str,
           operator: list[str]) -> list[int]:
    """BATCHES batches of new records with `name` set, written under `sv`, with the
    operator's command run a third of the way in; returns the change numbers."""
    pd.sv = sv
    numbers = []
    for b in range(BATCHES):
        batch = [pd.change("tasks", f"t-{start + b}-{i}", "r1",
                           f={"route": "r1", name: f"{sv}-{b}-{i}"}) for i in range(PER_BATCH)]
        numbers += [ch["n"] for ch in batch]
        pd.send_changes(batch)
        if b == BATCHES // 3:
            fleet.cli(*operator)
    return numbers


def test_publish_and_rollback_while_a_device_streams_on_two_servers(
        fleet: Fleet, tmp_path: Path) -> None:
    fleet.add_device("van-1", ["r1"])
    pd = ProtocolDevice("van-1", fleet.passwords["van-1"], port=fleet.port, scopes=["r1"],
                        sv=2)
    assert pd.connect() == "Success", fleet.broker_log_tail()
    # It takes versions from the server (what it does with them is not this test's).
    pd.hello(caps=["schema", "schema_push"])
    v3 = tmp_path / "fleet-v3.toml"
    v3.write_text(V3)
    config = str(fleet.server_config)

    # Version 2's `notes` streams while version 3 (a rename to `note`) is published.
    first = stream(pd, fleet, 0, 2, "notes", ["schema", "publish", str(v3), "--config", config])
    pd.wait_acked(first, timeout=60)
    for name in ("server-1", "server-2"):
        fleet.servers[name].wait_event("schema_reloaded",
                                       where=lambda e: e.get("version") == 3)
    # Now version 3's `note` streams while version 3 is rolled back.
    second = stream(pd, fleet, BATCHES, 3, "note", ["schema", "rollback", "--config", config])
    # Those written under 3 after the rollback are held (transient), not lost.
    pd.wait_answered(second, timeout=60)
    held = sorted(n for n in second if n not in pd.acks)
    for n in held:
        assert all(r["code"] == "schema_version" and not r["perm"]
                   for r in pd.rejections[n]), pd.rejections[n]
    assert sorted(set(pd.acks) & set(first)) == first
    assert all(len(pd.acks[n]) == 1 for n in first + second if n in pd.acks)

    with fleet.store.read() as txn:
        assert txn.dead_letters(10) == []
        after = None
        seen = 0
        while page := txn.records_after("tasks", after, 500):
            for _, key, doc in page:
                record = merge.from_json(doc)
                # Version 2 is live again: `notes` only, never `note`.
                assert "note" not in record.fields and "notes" in record.fields, (key, doc)
                seen += 1
            after = (page[-1][0], page[-1][1])
    assert seen == len(first) + len(second) - len(held)
