"""Faults between the merge server and PostgreSQL, with real processes on both sides.

The server process keeps running through a PostgreSQL crash (SIGKILL of the postmaster,
then a restart) and through an outage longer than its reconnect window: changes it could
not commit are refused as transient (`server_error`, not permanent), the devices resend
them, and in the end every change is applied exactly once and every device converges.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.pgserver import PgServer

pytestmark = [
    pytest.mark.e2e, pytest.mark.mosquitto, pytest.mark.postgres,
    pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed"),
]

SCOPE = "depot-7"
WRITES = 400   # increments per device, written while the device is offline


def test_server_rides_out_postgres_crash_and_outage(tmp_path: Path,
                                                    own_pg_server: PgServer) -> None:
    pg = own_pg_server
    url = pg.create_database("faults")
    with Fleet(tmp_path, "mosquitto", "postgres", url) as fleet:
        fleet.start(server=False)
        # A short reconnect window, so the outage below outlasts it.
        server_env = {"WAYSTATION_SERVER__STORE__RECONNECT_S": "2"}
        fleet.start_server(env=server_env)
        devs = ("van-1", "van-2")
        for dev in devs:
            fleet.add_device(dev, [SCOPE], sync={"batch_max_changes": 20,
                                                 "max_inflight_changes": 40})
        fleet.agent("van-1").put("inventory", "sku-1", {"depot": SCOPE, "sku": "sku-1"})
        fleet.start_agent("van-1")
        fleet.wait_drained("van-1", timeout=30)
        fleet.start_agent("van-2")
        fleet.wait_converged(*devs, timeout=30)

        # 1. PostgreSQL SIGKILLed while both devices drain a backlog, then restarted.
        for dev in devs:
            fleet.stop_agent(dev)
            ag = fleet.agent(dev)
            for _ in range(WRITES):
                ag.increment("inventory", "sku-1", "stock", 1)
            fleet.start_agent(dev, wait=False)
        fleet.wait(lambda: fleet.scope_seq(SCOPE) > 1, 30,
                   what="the drain under way", interval=0.01)
        pg.kill()
        left = sum(fleet.pending(dev) for dev in devs)
        assert left > 0, "the drain had finished: the kill was not mid-stream"
        pg.start()
        fleet.wait_drained(*devs, timeout=90)
        assert fleet.servers["server-1"].running, "the server must survive the crash"
        assert fleet.value("inventory", "sku-1", "stock") == 2 * WRITES

        # 2. An outage longer than the reconnect window: transient refusals, then a resend.
        pg.stop()
        for dev in devs:
            for _ in range(10):
                fleet.agent(dev).increment("inventory", "sku-1", "stock", 1)
        server = fleet.servers["server-1"]
        server.wait_event("store_failed", timeout=30)
        assert server.running
        for dev in devs:
            assert fleet.pending(dev) > 0
            assert fleet.agent(dev).dead_letters() == []
        pg.start()
        fleet.wait_drained(*devs, timeout=90)
        fleet.wait_converged(*devs, timeout=60)
        assert fleet.value("inventory", "sku-1", "stock") == 2 * WRITES + 20
        assert fleet.scope_seq(SCOPE) == 1 + 2 * WRITES + 20   # each change applied once
        for dev in devs:
            assert fleet.agent(dev).dead_letters() == []
