"""`after_restore` on both stores: sequences jump, and every device is ordered to resync
at once (`resync` commands the running or restarted server sends)."""

from __future__ import annotations

from broker.server.operations import RESTORE_SEQ_GAP, after_restore
from broker.server.registry import add_device
from broker.server.store.base import Store, WriteTxn


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
    assert out == {"d1": 3 + RESTORE_SEQ_GAP}
    with store.read() as txn:
        assert txn.purge_horizon("d1") == 3 + RESTORE_SEQ_GAP
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
    after_restore(store, 1_000, resync=False)
    with store.read() as txn:
        assert txn.commands() == []
