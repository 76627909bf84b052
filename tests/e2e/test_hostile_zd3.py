"""Capability `zd3` (PROTOCOL.md §3 "Recent traffic") against hostile devices, through
the real brokers and a server with a small `merge.recent_dictionary_bytes`: several
devices filling their 8 references of ~2 KB, and one sending streams with random
DICTIDs and flapping its caps. The cache stays within its bound (metric
`waystation_server_zd3_bytes`), every bad message gets its §8 code, no dead letter is
kept for `dictionary_unknown`, and a real agent keeps syncing meanwhile."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from schemas import zdict, zdict_schema
from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice

pytestmark = pytest.mark.e2e

SCOPE = "route-42"
LIMIT = 48 << 10
ZD3_BYTES = "waystation_server_zd3_bytes"
ZD3_UNKNOWN = 'waystation_server_zd3_streams_total{outcome="unknown"}'
ZD3_READ = 'waystation_server_zd3_streams_total{outcome="read"}'
CAPS = ["txn", "zd2", "zd3"]  # no zd1: this device reads plain zlib only
FDICT_HEADER = bytes([0x78, next(f for f in range(256)
                                 if f & 0x20 and (0x78 * 256 + f) % 31 == 0)])


@pytest.fixture
def fleet_options() -> dict[str, Any]:
    """The `fleet` fixture's servers serve metrics (tests/e2e/conftest.py)."""
    return {"metrics": True}


class Packer:
    """A protocol device's side of zd2/zd3: plaintext `changes` of a chosen size."""

    def __init__(self, pd: ProtocolDevice, base: bytes) -> None:
        self.pd, self.base = pd, base

    def plain(self, size: int = 0) -> tuple[int, bytes]:
        """(n, JSON text) of a one-change batch padded to `size` bytes (0: no padding)."""
        pd = self.pd
        ch = pd.change("tasks", f"t-{pd.next_n}", SCOPE, f={"route": SCOPE, "notes": ""})
        text = orjson.dumps(pd.changes_message([ch]))
        if size:
            ch["f"]["notes"] = "x" * (size - len(text))
            text = orjson.dumps(pd.changes_message([ch]))
            assert len(text) == size
        return ch["n"], text


def _hello(pd: ProtocolDevice, zd: int, caps: list[str]) -> None:
    before = len([m for m in pd.messages if m["type"] == "welcome"])
    pd.hello(caps=caps, zd=zd)
    pd.wait(lambda: len([m for m in pd.messages if m["type"] == "welcome"]) > before, 15,
            "a welcome")


def _codes(pd: ProtocolDevice, code: str) -> int:
    return sum(1 for e in pd.errors if e.get("code") == code)


# One fleet: the cache and the answers are the server's, the same over either broker
# and store; tests/server/test_zd3_hostile.py covers the engine without a broker.
@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_hostile_zd3_traffic_stays_within_the_bound(fleet: Fleet) -> None:
    """Six devices fill 8 references of ~2 KB each (twice what 48 KiB holds), a hostile
    one sends 300 streams with random DICTIDs, then flaps zd3 off and on ten times, and
    sends messages of 2,048 and 2,049 bytes: the cache never exceeds 48 KiB, the random
    streams are all `dictionary_unknown` with no dead letter, a zd3 stream after zd3
    was turned off is `malformed`, one made with the 2,048-byte message is read and one
    made with the 2,049-byte message is `dictionary_unknown`; the agent's 20 writes all
    merge."""
    fleet.stop_server()
    fleet.start_server(env={"WAYSTATION_SERVER__MERGE__RECENT_DICTIONARY_BYTES": str(LIMIT)})
    base = zdict_schema.dictionary(fleet.catalog)
    zd = zdict_schema.dict_id(base)
    fleet.add_device("van-1", ["depot-7"])
    fillers = [f"pd-{i}" for i in range(6)]
    for dev in [*fillers, "pd-evil"]:
        fleet.add_device(dev, [SCOPE])
    fleet.start_agent("van-1")
    van = fleet.agent("van-1")
    van.put("inventory", "sku-1", {"depot": "depot-7", "sku": "sku-1"})
    fleet.wait_drained("van-1")
    peak = 0.0

    def sample() -> None:
        nonlocal peak
        m = fleet.metrics()
        peak = max(peak, m[ZD3_BYTES])
        assert m[ZD3_BYTES] <= LIMIT, m[ZD3_BYTES]

    devices = []
    for dev in fillers:
        pd = ProtocolDevice(dev, fleet.passwords[dev], port=fleet.port, scopes=[SCOPE])
        assert pd.connect() == "Success", fleet.broker_log_tail()
        _hello(pd, zd, CAPS)
        packer = Packer(pd, base)
        for _ in range(10):
            n, text = packer.plain(2000)
            pd.send_raw(zdict.pack(text, base))
            pd.wait_acked([n])
        van.increment("inventory", "sku-1", "stock", 1)
        sample()
        devices.append(pd)

    evil = ProtocolDevice("pd-evil", fleet.passwords["pd-evil"], port=fleet.port,
                          scopes=[SCOPE])
    assert evil.connect() == "Success", fleet.broker_log_tail()
    _hello(evil, zd, CAPS)
    rng = random.Random(7)
    for _ in range(300):
        evil.client.publish(evil.up, FDICT_HEADER + rng.getrandbits(32).to_bytes(4, "big")
                            + rng.randbytes(rng.randint(0, 200)), qos=1)
    evil.wait(lambda: _codes(evil, "dictionary_unknown") >= 300, 60,
              "300 dictionary_unknown answers")
    for _ in range(4):
        van.increment("inventory", "sku-1", "stock", 1)
    sample()

    packer = Packer(evil, base)
    for _ in range(10):
        _hello(evil, zd, CAPS)
        n, first = packer.plain()
        evil.send_raw(zdict.pack(first, base))
        evil.wait_acked([n])
        n, text = packer.plain()
        evil.send_raw(zdict.pack(text, base + first))
        evil.wait_acked([n])
        _hello(evil, zd, ["txn", "zd2"])  # zd3 off: the server forgets its references
        before = _codes(evil, "malformed")
        n, text = packer.plain()
        evil.send_raw(zdict.pack(text, base + first))
        evil.wait(lambda b=before: _codes(evil, "malformed") > b, 15, "malformed")
        evil.next_n = n  # that change was never applied: send its number again
    sample()

    _hello(evil, zd, CAPS)
    for size, readable in ((2048, True), (2049, False)):
        n, ref = packer.plain(size)
        evil.send_raw(zdict.pack(ref, base))
        evil.wait_acked([n])
        unknown = _codes(evil, "dictionary_unknown")
        n, text = packer.plain()
        evil.send_raw(zdict.pack(text, base + ref))
        if readable:
            evil.wait_acked([n])
        else:
            evil.wait(lambda u=unknown: _codes(evil, "dictionary_unknown") > u, 15,
                      "dictionary_unknown for a stream made with a 2,049-byte message")
            evil.next_n = n

    for _ in range(5):
        van.increment("inventory", "sku-1", "stock", 1)
    fleet.wait_drained("van-1", timeout=120)
    assert fleet.value("inventory", "sku-1", "stock") == 15
    sample()
    m = fleet.metrics()
    assert m[ZD3_UNKNOWN] >= 301 and m[ZD3_READ] >= 11, m
    assert peak > LIMIT // 2, peak  # the fillers did fill it
    letters = fleet.server_dead_letters()
    assert not [d for d in letters if d["code"] == "dictionary_unknown"], letters
    mine = [d for d in letters if d["device"] == "pd-evil"]
    assert {d["code"] for d in mine} == {"malformed"} and len(mine) <= 11, mine
    assert fleet.servers["server-1"].running
    for pd in [*devices, evil]:
        pd.close()
