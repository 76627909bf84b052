"""The server's store restored from a backup, with devices that saw more than the backup
holds: they resync by snapshot, keep their pending writes, give back the changes acked
after the backup (their journal, PROTOCOL.md §9.7), and converge.

Real processes: the backup is taken while the server runs (`waystation server backup`
for LMDB, pg_dump for PostgreSQL); the restore runs with the server stopped (`waystation
server restore SRC`, or pg_restore and `server restore --in-place`).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.pgserver import find_bin_dir
from waystation.atrest.rewrite import KILL_POINT_ENV

pytestmark = pytest.mark.e2e

SCOPE = "depot-7"


def _backup(fleet: Fleet, dest: Path) -> None:
    """`server backup` (LMDB), or pg_dump (PostgreSQL), while the server runs."""
    if fleet.store_kind == "lmdb":
        fleet.cli("server", "backup", "--config", str(fleet.server_config), str(dest))
        assert (dest / "store" / "data.mdb").is_file()
        return
    bin_dir = find_bin_dir()
    assert bin_dir is not None and fleet.pg_url is not None
    subprocess.run([str(bin_dir / "pg_dump"), "-Fc", "-f", str(dest), fleet.pg_url],
                   check=True, capture_output=True, timeout=120)


def _restore(fleet: Fleet, backup: Path, aside: Path) -> str:
    """With the server stopped: `server restore SRC` (LMDB), or pg_restore and `server
    restore --in-place` (PostgreSQL), as deploy/README.md says. Returns its output."""
    fleet.close_store()
    if fleet.store_kind == "lmdb":
        shutil.move(fleet.server_data / "store", aside)
        argv = [str(backup)]
    else:
        bin_dir = find_bin_dir()
        assert bin_dir is not None and fleet.pg_url is not None
        subprocess.run([str(bin_dir / "pg_restore"), "--clean", "--if-exists",
                        "--single-transaction", "-d", fleet.pg_url, str(backup)],
                       check=True, capture_output=True, timeout=120)
        argv = ["--in-place"]
    return fleet.cli("server", "restore", "--config", str(fleet.server_config), *argv).stdout


def test_restore_gets_back_what_devices_had_acked_after_the_backup(
        fleet: Fleet, tmp_path: Path) -> None:
    """Applied and acked after the backup: gone from the outbox, not in the backup. The
    device's journal gives it back (PROTOCOL.md §9.7): the restored server ends with
    every write, the counter's increments exactly once, and so does every device. A
    kill -9 of the agent inside its replay transaction loses and doubles nothing."""
    for dev in ("van-1", "van-2"):
        fleet.add_device(dev, [SCOPE])
    fleet.start_agents("van-1", "van-2")
    one, two = fleet.agent("van-1"), fleet.agent("van-2")
    one.put("inventory", "sku-a", {"depot": SCOPE, "sku": "sku-a"})
    one.increment("inventory", "sku-a", "stock", 10)
    fleet.wait_converged("van-1", "van-2", timeout=30)
    backup = tmp_path / "backup"
    _backup(fleet, backup)

    one.put("inventory", "sku-late", {"depot": SCOPE, "sku": "sku-late", "bin": "B-7"})
    one.increment("inventory", "sku-a", "stock", 5)
    fleet.wait_converged("van-1", "van-2", timeout=30)
    assert one.status().journal["changes"] == 4   # every acked change, within the window
    seen = fleet.scope_seq(SCOPE)

    fleet.stop_server()
    fleet.stop_agent("van-1")
    # Written while the server is down: pending, and must survive the resync.
    two.increment("inventory", "sku-a", "stock", 2)
    said = _restore(fleet, backup, tmp_path / "old-store")
    assert "devices re-send what they hold" in said
    assert fleet.record("inventory", "sku-late") is None   # lost by the restore...
    fleet.close_store()

    # van-1's sync process dies (kill -9, fault injection) inside the transaction that
    # moves its journaled changes back into the outbox: nothing of it may stay. (Its
    # service restarts it, and it dies again at the same point, until stopped.)
    proc = fleet.agents["van-1"].start(env={KILL_POINT_ENV: "replay"})
    fleet.start_server()
    proc.wait_event("sync_process_exited", timeout=60,
                    where=lambda e: e.get("code") == -signal.SIGKILL)
    fleet.stop_agent("van-1")
    assert one.pending() == [] and one.status().replayed is None
    assert one.status().journal["changes"] == 4

    fleet.start_agent("van-1")
    fleet.wait(lambda: one.status().replayed, timeout=30, what="van-1 replays its journal")
    replayed = one.status().replayed
    assert replayed is not None and replayed["changes"] == 2   # sku-late and the +5
    fleet.wait_converged("van-1", "van-2", timeout=60)

    assert fleet.scope_seq(SCOPE) > seen   # sequences moved on, never reused
    assert fleet.value("inventory", "sku-late", "bin") == "B-7"   # ...and back
    assert fleet.value("inventory", "sku-a", "stock") == 10 + 5 + 2   # each once
    for ag in (one, two):
        late = ag.get("inventory", "sku-late")
        assert late is not None and late.fields["bin"] == "B-7"
        rec = ag.get("inventory", "sku-a")
        assert rec is not None and rec.fields["stock"] == 17
        assert ag.dead_letters() == []
    assert fleet.server_dead_letters() == []
    # Acked again: `agent status` says it in the past tense (for a day, agent.journal).
    replayed = one.status().replayed
    assert replayed is not None and not replayed["resending"] and not replayed["past"]
    assert replayed["settled"] is not None and replayed["settled"] >= replayed["t"]
    assert one.status().summary().endswith("2 acked changes sent again")
    # The journal holds them again, at their new sequence numbers.
    assert one.status().journal["changes"] == 4


@pytest.mark.parametrize("broker", ["embedded", pytest.param("mosquitto", marks=[
    pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed")])])
def test_restore_makes_quiet_devices_resync_at_once(tmp_path: Path, broker: str) -> None:
    """Nobody writes after the restore, and the devices keep no journal of acked changes
    (`acked_journal_days = 0`: as agents before §9.7): every device still resyncs at
    once (the restore queues a `resync` command the restarted server sends), so no
    device goes on showing a record the restored server does not have."""
    with Fleet(tmp_path / "fleet", broker) as fleet:  # type: ignore[arg-type]
        fleet.start()
        for dev in ("van-1", "van-2"):
            fleet.add_device(dev, [SCOPE])
            fleet.edit_agent_config(dev, lambda d: d.setdefault("sync", {}).update(
                acked_journal_days=0))
        fleet.start_agents("van-1", "van-2")
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
