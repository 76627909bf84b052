"""The server's store restored from a backup, with devices that saw more than the backup
holds: they resync by snapshot, keep their pending writes, and converge.

Real processes: the backup is taken by `waystation server backup` while the server runs;
the restore is `waystation server restore` with the server stopped (LMDB store).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet

pytestmark = pytest.mark.e2e

SCOPE = "depot-7"


def test_restore_from_backup_resyncs_devices_by_snapshot(tmp_path: Path) -> None:
    with Fleet(tmp_path / "fleet", "embedded") as fleet:
        fleet.start()
        for dev in ("van-1", "van-2"):
            fleet.add_device(dev, [SCOPE])
            fleet.start_agent(dev)
        one, two = fleet.agent("van-1"), fleet.agent("van-2")
        one.put("inventory", "sku-a", {"depot": SCOPE, "sku": "sku-a"})
        one.increment("inventory", "sku-a", "stock", 10)
        fleet.wait_converged("van-1", "van-2", timeout=30)

        backup = tmp_path / "backup"
        fleet.cli("server", "backup", "--config", str(fleet.server_config), str(backup))
        assert (backup / "store" / "data.mdb").is_file()

        # After the backup: applied and acked, so gone from the devices' outboxes, and
        # not in the backup.
        one.put("inventory", "sku-late", {"depot": SCOPE, "sku": "sku-late"})
        one.increment("inventory", "sku-a", "stock", 5)
        fleet.wait_converged("van-1", "van-2", timeout=30)
        seen = fleet.scope_seq(SCOPE)

        fleet.stop_server()
        fleet.close_store()
        # Written while the server is down: pending, and must survive the resync.
        two.increment("inventory", "sku-a", "stock", 2)
        shutil.move(fleet.server_data / "store", tmp_path / "old-store")
        fleet.cli("server", "restore", "--config", str(fleet.server_config), str(backup))
        fleet.start_server()

        fleet.wait_drained("van-1", "van-2", timeout=30)
        fleet.wait_converged("van-1", "van-2", timeout=30)
        assert fleet.scope_seq(SCOPE) > seen   # sequences moved on, never reused
        assert fleet.record("inventory", "sku-late") is None
        for ag in (one, two):
            assert ag.get("inventory", "sku-late") is None   # dropped by the snapshot
            rec = ag.get("inventory", "sku-a")
            assert rec is not None and rec.fields["stock"] == 10 + 2
        assert fleet.value("inventory", "sku-a", "stock") == 12
        assert two.dead_letters() == [] and one.dead_letters() == []


@pytest.mark.parametrize("broker", ["embedded", pytest.param("mosquitto", marks=[
    pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed")])])
def test_restore_makes_quiet_devices_resync_at_once(tmp_path: Path, broker: str) -> None:
    """Nobody writes after the restore: every device still resyncs at once (the restore
    queues a `resync` command the restarted server sends), so no device goes on showing
    a record the restored server does not have."""
    with Fleet(tmp_path / "fleet", broker) as fleet:  # type: ignore[arg-type]
        fleet.start()
        for dev in ("van-1", "van-2"):
            fleet.add_device(dev, [SCOPE])
            fleet.start_agent(dev)
        one, two = fleet.agent("van-1"), fleet.agent("van-2")
        one.put("inventory", "sku-a", {"depot": SCOPE, "sku": "sku-a"})
        fleet.wait_converged("van-1", "van-2", timeout=30)
        backup = tmp_path / "backup"
        fleet.cli("server", "backup", "--config", str(fleet.server_config), str(backup))
        one.put("inventory", "sku-late", {"depot": SCOPE, "sku": "sku-late"})
        fleet.wait_converged("van-1", "van-2", timeout=30)
        assert two.get("inventory", "sku-late") is not None

        fleet.stop_server()
        fleet.close_store()
        shutil.move(fleet.server_data / "store", tmp_path / "old-store")
        fleet.cli("server", "restore", "--config", str(fleet.server_config), str(backup))
        with fleet.store.read() as txn:
            queued = [c for c in txn.commands() if c.cmd == "resync"]
        assert sorted(c.device for c in queued) == ["van-1", "van-2"]
        fleet.close_store()
        fleet.start_server()

        # No device writes anything: the resync alone brings them to the restored state.
        fleet.wait(lambda: one.get("inventory", "sku-late") is None
                   and two.get("inventory", "sku-late") is None, timeout=30,
                   what="devices still show a record the restored server lost")
        fleet.wait_converged("van-1", "van-2", timeout=30)
        assert one.get("inventory", "sku-a") is not None

        def resyncs_done() -> bool:
            with fleet.store.read() as txn:
                return all(c.done_ms for c in txn.commands() if c.cmd == "resync")

        fleet.wait(resyncs_done, timeout=30, what="devices report their resync done")
