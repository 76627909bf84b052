"""One device flooding the server (issue 8 §3): the server's memory for waiting messages
stays bounded, another device keeps being served, the flood leaves few dead letters."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice

pytestmark = pytest.mark.e2e

INTAKE_MAX = 2 << 20
DEVICE_QUOTA = 1 << 20
PEAK = 'waystation_server_intake_bytes{state="peak"}'
LIMIT = 'waystation_server_intake_bytes{state="limit"}'
REFUSED = 'waystation_server_intake_messages_total{outcome="refused_too_large"}'
DROPPED = 'waystation_server_intake_messages_total{outcome="dropped_over_quota"}'
QUEUED = 'waystation_server_intake_messages_total{outcome="queued"}'


@pytest.fixture
def fleet_options() -> dict[str, Any]:
    """The `fleet` fixture's servers serve metrics (tests/e2e/conftest.py)."""
    return {"metrics": True}


def _small_intake(fleet: Fleet) -> None:
    """Restart the server with a small intake, so that a test-sized flood meets it."""
    fleet.stop_server()
    path = fleet.server_configs["server-1"]
    path.write_text(path.read_text() + f"\n[intake]\nmax_bytes = {INTAKE_MAX}\n"
                                       f"device_bytes = {DEVICE_QUOTA}\n")
    fleet.start_server()


def _flood(pd: ProtocolDevice, payloads: list[bytes]) -> None:
    """Publish everything at once (QoS 1, not waiting for each PUBACK), then wait until
    the broker took it all."""
    infos = [pd.client.publish(pd.up, p, qos=1) for p in payloads]
    pd.wait(lambda: all(i.is_published() for i in infos) or not pd.connected, 300,
            "the broker taking the flood")
    assert pd.connected


@contextlib.contextmanager
def stalled_store(fleet: Fleet) -> Iterator[None]:
    """Make the server's worker wait in its next store transaction that keeps a dead
    letter, while the network thread goes on reading (LMDB: this process holds the
    write lock; PostgreSQL: it holds a lock on the dead-letter table)."""
    if fleet.store_kind == "postgres":
        assert fleet.pg_url is not None
        with psycopg.connect(fleet.pg_url) as conn:
            conn.execute("LOCK TABLE waystation.dead_letters IN EXCLUSIVE MODE")
            try:
                yield
            finally:
                conn.rollback()
        return
    held, release = threading.Event(), threading.Event()

    def hold(txn: Any) -> None:
        held.set()
        release.wait(300)

    holder = threading.Thread(target=fleet.store.transact, args=(hold,))
    holder.start()
    assert held.wait(30)
    try:
        yield
    finally:
        release.set()
        holder.join(60)


def _wait_answered(fleet: Fleet, pd: ProtocolDevice) -> None:
    """Until a catch-up sent after the flood is answered: the server has then handled
    (or dropped) every earlier message of the device (its queue is FIFO). Sent again
    while unanswered, since the intake may drop it too."""
    fleet.wait(pd.catchup_answered, 180, what="the flooding device's catch-up answered")


def test_flood_from_one_device_stays_bounded_and_others_are_served(fleet: Fleet) -> None:
    """300 payloads just over the 256 KiB limit and 6,000 small bad messages from one
    device, arriving while the server's worker is stuck in a transaction: the
    intake's peak stays under its bound (oversized payloads are refused at intake, the
    flooding device is cut at its quota), the other device's 40 writes are all acked,
    and the flood leaves at most the first few dead letters per refusal code."""
    _small_intake(fleet)
    fleet.add_device("van-1", ["depot-7"])
    fleet.add_device("pd-flood", ["depot-7"])
    fleet.start_agent("van-1")
    van = fleet.agent("van-1")
    van.put("inventory", "sku-1", {"depot": "depot-7", "sku": "sku-1"})
    fleet.wait_drained("van-1")
    pd = ProtocolDevice("pd-flood", fleet.passwords["pd-flood"], port=fleet.port,
                        scopes=["depot-7"])
    assert pd.connect() == "Success", fleet.broker_log_tail()
    rng = random.Random(8)
    oversized = [b'{"type":"changes","v":1,"pad":"' + bytes([97 + i % 26]) * 263_000 + b'"}'
                 for i in range(300)]
    junk = [rng.randbytes(rng.randint(1, 3000)) for _ in range(6000)]
    with stalled_store(fleet):
        # The worker is stuck in its next transaction: what arrives now waits in the
        # intake, where the flooding device meets its quota.
        _flood(pd, oversized[:150])
        for _ in range(20):
            van.increment("inventory", "sku-1", "stock", 1)
        _flood(pd, junk)
        for _ in range(20):
            van.increment("inventory", "sku-1", "stock", 1)
        _flood(pd, oversized[150:])
        fleet.wait(lambda: fleet.metrics()[DROPPED] >= 1, 120,
                   what="the flooding device cut at its quota")
        assert fleet.metrics()[PEAK] <= INTAKE_MAX
    fleet.wait_drained("van-1", timeout=120)
    assert fleet.value("inventory", "sku-1", "stock") == 40
    _wait_answered(fleet, pd)

    m = fleet.metrics()
    assert m[LIMIT] == INTAKE_MAX
    assert 0 < m[PEAK] <= INTAKE_MAX
    assert m[REFUSED] >= 1 and m[DROPPED] >= 1, m
    assert m[REFUSED] + m[DROPPED] + m[QUEUED] >= 300 + 6000
    letters = [d for d in fleet.server_dead_letters() if d["device"] == "pd-flood"]
    by_code: dict[str, int] = {}
    for d in letters:
        by_code[d["code"]] = by_code.get(d["code"], 0) + 1
    assert by_code.get("too_large", 0) <= 10 and by_code.get("malformed", 0) <= 10, by_code
    big = [d for d in letters if d["code"] == "too_large"]
    assert big and all(d["size"] > 262_144 and len(d["raw"]) <= 4096 for d in big)
    assert fleet.server.running and fleet.server.starts == 2
    pd.close()


WAITS = "waystation_server_intake_waits_total"


def test_intake_full_holds_the_broker_back_and_loses_nothing_it_queued(fleet: Fleet) -> None:
    """Three devices each filling their quota while the worker is stuck fill the whole
    intake: the network thread then waits (backpressure) instead of growing past the
    bound, and once the worker moves again every write of a third device is acked."""
    _small_intake(fleet)
    for dev in ("van-1", "pd-a", "pd-b", "pd-c"):
        fleet.add_device(dev, ["depot-7"])
    fleet.start_agent("van-1")
    van = fleet.agent("van-1")
    van.put("inventory", "sku-1", {"depot": "depot-7", "sku": "sku-1"})
    fleet.wait_drained("van-1")
    floods = []
    for dev in ("pd-a", "pd-b", "pd-c"):
        pd = ProtocolDevice(dev, fleet.passwords[dev], port=fleet.port, scopes=["depot-7"])
        assert pd.connect() == "Success", fleet.broker_log_tail()
        floods.append(pd)
    junk = [b"\x01" * 200_000 for _ in range(8)]  # 1.6 MB each: past one device's quota
    with stalled_store(fleet):
        for pd in floods:
            _flood(pd, junk)
        for _ in range(10):
            van.increment("inventory", "sku-1", "stock", 1)
        fleet.wait(lambda: fleet.metrics()[WAITS] >= 1, 120,
                   what="the network thread waiting for room")
        m = fleet.metrics()
        assert m['waystation_server_intake_bytes{state="waiting"}'] <= INTAKE_MAX
        assert m[PEAK] <= INTAKE_MAX
    fleet.wait_drained("van-1", timeout=120)
    assert fleet.value("inventory", "sku-1", "stock") == 10
    for pd in floods:
        _wait_answered(fleet, pd)
        pd.close()
    assert fleet.metrics()[PEAK] <= INTAKE_MAX
