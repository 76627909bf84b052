"""zd1, zd2 and zd3 implemented from docs/PROTOCOL.md alone (§3, §7.1, §7.11, §8, §11).

Our agent shares `schemas/zdict*.py` with the server, so a wrong or ambiguous sentence
in the text would go unnoticed by its tests (tests/e2e/test_compact_encoding.py). Here
the device is tests/e2e/protocol_device.py with tests/e2e/protocol_zd.py: standard
library and paho only, the zd1 dictionary from `schemas/zd1.dict`, the zd2 dictionary
derived from the schema file by the text's rules, zd3 references kept by the text's
rules. The server agreeing to its `hello.zd`, reading its zd3 streams (its metrics
count them), and answering after a restart with `dictionary_unknown` that the device
recovers from, shows that the text is enough."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice
from tests.e2e.protocol_zd import ZD1_ID
from waystation.config import ServerConfig, load_config

pytestmark = pytest.mark.e2e

ZD3_READ = 'waystation_server_zd3_streams_total{outcome="read"}'
ZD3_UNKNOWN = 'waystation_server_zd3_streams_total{outcome="unknown"}'
SCOPE = "route-42"


@pytest.fixture
def fleet_options() -> dict[str, Any]:
    """The `fleet` fixture's servers serve metrics (tests/e2e/conftest.py)."""
    return {"metrics": True}


def schema_text(fleet: Fleet) -> str:
    """The collection-schema file the server runs: the file a device is configured with
    (§3 "Schema dictionary" derives zd2's dictionary from it)."""
    return load_config(ServerConfig, fleet.server_config, {}).schema_path().read_text()


def joined(fleet: Fleet, dev: str, **options: Any) -> ProtocolDevice:
    fleet.add_device(dev, [SCOPE])
    pd = ProtocolDevice(dev, fleet.passwords[dev], port=fleet.port, scopes=[SCOPE],
                        **options)
    assert pd.connect() == "Success", fleet.broker_log_tail()
    pd.hello()
    return pd


def lone_change(pd: ProtocolDevice, key: str, note: str) -> int:
    """One put of a ~300-byte record, sent alone; its n."""
    ch = pd.change("tasks", key, SCOPE, f={
        "route": SCOPE, "customer": "Hendrikse Bakery", "status": "out",
        "address": "Keizersgracht 12, 1015 CS Amsterdam", "eta": 1764000040035,
        "notes": f"{note}: ring twice, the side door is around the corner by the bike rack"})
    pd.send_changes([ch])
    return int(ch["n"])


def test_docs_only_device_agrees_zd1_zd2_zd3_and_is_read(fleet: Fleet) -> None:
    """The device offers zd1, zd2 (naming its schema dictionary's DICTID) and zd3; the
    server agrees all three; its lone changes go out with zd3 references and the server
    reads them (metrics), acks them, and another device sees them; the down messages it
    gets with the zd1 dictionary it decodes. After a server restart the references are
    gone: `dictionary_unknown`, the device forgets them, resends with zd2, the change
    arrives, nothing is dead-lettered."""
    pd = joined(fleet, "pd-zd", caps=["zd1", "zd2", "zd3"], schema=schema_text(fleet))
    other = joined(fleet, "pd-v1")   # a v1 device: no capabilities
    try:
        welcome = pd.wait(lambda: pd.welcomes, 15, "a welcome")[-1]
        assert {"zd1", "zd2", "zd3"} <= set(welcome["caps"]), welcome
        assert pd.agreed == {"zd1", "zd2", "zd3"}
        read_before = fleet.metrics()[ZD3_READ]

        for i in range(6):   # one at a time, each answered before the next: a quiet link
            pd.wait_acked([lone_change(pd, f"t-{i}", f"lone change {i}")])
        sent_zd3 = pd.sent_how["zd3"]
        assert sent_zd3 == 5, pd.sent_how   # every one after the first
        fleet.wait(lambda: fleet.metrics()[ZD3_READ] - read_before >= sent_zd3, 15,
                   what=f"{sent_zd3} zd3 streams read by the server")
        assert fleet.metrics()[ZD3_UNKNOWN] == 0
        assert pd.rejections == {} and pd.errors == []

        other.sync_from_server()
        assert {f"t-{i}" for i in range(6)} <= {k for (_, k) in other.records}

        # Down: the acks came with the zd1 dictionary (small messages included, §3), and
        # so does a delta of the other device's change.
        assert pd.received_how["zd1"] >= 1, pd.received_how
        zd1_before = pd.received_how["zd1"]
        ch = other.change("tasks", "t-other", SCOPE, f={"route": SCOPE, "status": "out"})
        other.send_changes([ch])
        other.wait_acked([ch["n"]])
        pd.wait(lambda: ("tasks", "t-other") in pd.records, 15, "the other's change")
        assert pd.received_how["zd1"] > zd1_before
        assert pd.undecodable == []

        # A restarted server holds no references: the next zd3 stream is refused, the
        # device forgets its references and sends the change again with zd2.
        fleet.kill_server()
        fleet.start_server()
        zd2_before, errors_before = pd.sent_how["zd2"], len(pd.errors)
        n = lone_change(pd, "t-after", "after the restart")
        assert pd.sent_how["zd3"] == sent_zd3 + 1, pd.sent_how
        assert pd.wait_error("dictionary_unknown", 30, after=errors_before)["code"]
        pd.wait_acked([n], 30)
        assert pd.sent_how["zd2"] > zd2_before, pd.sent_how
        assert fleet.metrics()[ZD3_UNKNOWN] >= 1
        fleet.wait(lambda: fleet.record("tasks", "t-after"), 30, what="the change stored")
        other.sync_from_server()
        assert ("tasks", "t-after") in other.records
        assert n not in pd.rejections
        assert fleet.server_dead_letters() == []

        # And zd3 works again from the new references.
        read_now = fleet.metrics()[ZD3_READ]
        for i in range(3):
            pd.wait_acked([lone_change(pd, f"t-again-{i}", "again")])
        fleet.wait(lambda: fleet.metrics()[ZD3_READ] > read_now, 15,
                   what="zd3 read again after the restart")
        assert other.undecodable == [] and other.received_how["zd1"] == 0
    finally:
        pd.close()
        other.close()


def test_zd3_is_not_agreed_without_zd2(fleet: Fleet) -> None:
    """§3 "Recent traffic": zd3 is agreed only together with zd2. A device offering zd3
    (and zd1) without zd2 gets zd1 alone, and its changes still sync."""
    pd = joined(fleet, "pd-nozd2", caps=["zd1", "zd3"], schema=schema_text(fleet))
    try:
        welcome = pd.wait(lambda: pd.welcomes, 15, "a welcome")[-1]
        assert "zd1" in welcome["caps"]
        assert "zd2" not in welcome["caps"] and "zd3" not in welcome["caps"], welcome
        for i in range(3):
            pd.wait_acked([lone_change(pd, f"t-{i}", "no zd2")])
        assert pd.sent_how["zd3"] == pd.sent_how["zd2"] == 0 and pd.sent_how["zd1"] >= 3
        assert fleet.metrics()[ZD3_READ] == 0
    finally:
        pd.close()


def test_a_dictionary_id_the_server_does_not_hold_gets_no_zd2(fleet: Fleet) -> None:
    """§7.1 `zd`: the server agrees zd2 (and so zd3) only when it holds the dictionary
    the id names; a schema copy with one more field derives another one."""
    text = schema_text(fleet)
    assert "[collections.tasks.fields]\n" in text
    copy = text.replace("[collections.tasks.fields]\n",
                        '[collections.tasks.fields]\nextra = { type = "string" }\n')
    pd = joined(fleet, "pd-copy", caps=["zd1", "zd2", "zd3"], schema=copy)
    try:
        assert pd.zd.zd_id not in (None, ZD1_ID)
        welcome = pd.wait(lambda: pd.welcomes, 15, "a welcome")[-1]
        assert "zd1" in welcome["caps"]
        assert "zd2" not in welcome["caps"] and "zd3" not in welcome["caps"], welcome
        pd.wait_acked([lone_change(pd, "t-1", "zd1 only")])
        assert pd.sent_how["zd1"] >= 1
    finally:
        pd.close()


def test_a_zd1_agreement_outlives_the_connection(fleet: Fleet) -> None:
    """§3 "Preset dictionary": the server keeps what it agreed (§7.11), so a device that
    agreed zd1 - with `z: false` even - gets zd1 streams on its next connection before
    any new welcome, and must read them."""
    pd = joined(fleet, "pd-keep", caps=["zd1"], z=False)
    other = joined(fleet, "pd-other")
    try:
        assert pd.wait(lambda: pd.welcomes, 15, "a welcome")[-1]["caps"] == ["zd1"]
        pd.sync_from_server()
        pd.close()
        for i in range(3):
            ch = other.change("tasks", f"t-{i}", SCOPE, f={"route": SCOPE, "status": "out"})
            other.send_changes([ch])
            other.wait_acked([ch["n"]])
        pd.restart()   # no hello on this connection: nothing agreed on it yet
        welcomes, zd1_before = len(pd.welcomes), pd.received_how["zd1"]
        pd.sync_from_server()
        assert {("tasks", f"t-{i}") for i in range(3)} <= set(pd.records)
        assert pd.received_how["zd1"] > zd1_before, pd.received_how
        assert len(pd.welcomes) == welcomes and pd.agreed == set()
        assert pd.undecodable == []
    finally:
        pd.close()
        other.close()
