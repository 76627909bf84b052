"""`after_restore` on both stores: sequences jump, and every device is ordered to resync
at once (`resync` commands the running or restarted server sends)."""

from __future__ import annotations

from pathlib import Path

from broker.server import liveness
from broker.server.operations import RESTORE_SEQ_GAP, after_restore
from broker.server.registry import add_device
from broker.server.store.base import Store, WriteTxn
from broker.server.store.rows import ServerRow
from tests.server.helpers import by_device, changes, make_engine, oks, rejections, task
from waystation import merge


def test_after_restore_jumps_and_queues_one_resync_per_device(store: Store) -> None:
    add_device(store, "van-1", ["d1"], 5)
    add_device(store, "van-2", ["d1", "d2"], 5)

    def seqs(txn: WriteTxn) -> None:
        for _ in range(3):
            txn.allocate_seq("d1")
    store.transact(seqs)
    with store.read() as txn:
        gen = txn.registry_generation()
    out = after_restore(store, 1_000)
    # d2 had no record in the backup, but devices may have seen numbers in it since:
    # it jumps too, so none of them is handed out again below a device's checkpoint.
    assert out == {"d1": 3 + RESTORE_SEQ_GAP, "d2": RESTORE_SEQ_GAP}
    with store.read() as txn:
        assert txn.purge_horizon("d1") == 3 + RESTORE_SEQ_GAP
        assert txn.purge_horizon("d2") == RESTORE_SEQ_GAP
        assert txn.scope_seq("d2") == RESTORE_SEQ_GAP
        cmds = txn.commands()
        assert txn.registry_generation() > gen      # a running server notices
    assert sorted((c.device, c.cmd, c.done_ms) for c in cmds) == [
        ("van-1", "resync", 0), ("van-2", "resync", 0)]
    # Each device is told what the restored store had reached in its scopes (before
    # the jump; 0 for a scope it never saw), so it gives back what is above (§9.7).
    args = {c.device: c.args for c in cmds}
    assert args == {"van-1": {"why": "restore", "seqs": {"d1": 3}},
                    "van-2": {"why": "restore", "seqs": {"d1": 3, "d2": 0}}}
    assert all(c.created_ms == 1_000 for c in cmds)
    assert len({c.id for c in cmds}) == 2


def test_after_restore_without_devices_or_resync(store: Store) -> None:
    assert after_restore(store, 1_000) == {}
    add_device(store, "van-1", ["d1"], 5)
    # the backup was taken while server-1 ran; server-2 had stopped cleanly before
    store.transact(lambda txn: txn.put_server(ServerRow("server-1", "main", "1", 100, 900)))
    store.transact(lambda txn: txn.put_server(
        ServerRow("server-2", "main", "1", 100, 500, stopped_ms=500)))
    after_restore(store, 1_000, resync=False)
    with store.read() as txn:
        assert txn.commands() == []
        servers = {r.id: r for r in txn.servers()}
    # no server runs on a restored store: `server status` says so, not "running"
    assert liveness.state(servers["server-1"], 1_000, 30_000) == "stopped"
    assert servers["server-1"].stopped_ms == 900
    assert servers["server-2"].stopped_ms == 500


def test_changes_sent_again_after_a_restore_apply_once(tmp_path: Path,
                                                       store: Store) -> None:
    """What a device gives back after a restore (PROTOCOL.md §9.7): a change the restored
    store never saw is applied (its increment once), at a sequence after the jump; one
    it did see, sent again identical, is a duplicate with its original q, never
    `id_reused`; sent again, the replayed one is a duplicate too."""
    engine, _, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store)
    inc_1 = {**task(1, "t-1"), "i": {"attempts": 1}}
    first = by_device(engine.handle_up("van-1", changes("van-1", [inc_1])))
    assert [ok[:3] for ok in oks(first["van-1"])] == [[1, "r1", 1]]
    after_restore(store, 1_000)   # as if the backup had been taken here
    inc_2 = {**task(2, "t-1", create=False), "i": {"attempts": 5}}
    out = by_device(engine.handle_up("van-1", changes("van-1", [inc_1, inc_2])))
    acked = {ok[0]: ok for ok in oks(out["van-1"])}
    assert rejections(out["van-1"]) == []
    assert acked[1][2] == 1                              # the backup had it
    assert acked[2][2] == 1 + RESTORE_SEQ_GAP + 1        # new: after the jump
    again = by_device(engine.handle_up("van-1", changes("van-1", [inc_2])))
    assert [ok[2] for ok in oks(again["van-1"])] == [1 + RESTORE_SEQ_GAP + 1]
    with store.read() as txn:
        raw = txn.get_record("tasks", "t-1")
    assert raw is not None and merge.to_rec(merge.from_json(raw))["f"]["attempts"] == 1 + 5
