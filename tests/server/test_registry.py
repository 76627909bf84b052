"""The device registry: operator operations and the engine's in-memory view."""

from __future__ import annotations

import dataclasses

import pytest

from broker.errors import DeviceExists, InvalidArgument, UnknownDevice
from broker.server.registry import (
    Registry,
    add_device,
    enable_device,
    issue_command,
    list_devices,
    remove_device,
    set_enabled,
    set_scopes,
)
from broker.server.store.base import OutcomeRow, Store, WriteTxn


def test_add_validates_and_refuses_duplicates(store: Store) -> None:
    """Ids and scopes are checked; a second add of the same id fails; scopes dedupe."""
    row = add_device(store, "van-1", ["r1", "r2", "r1"], 5)
    assert row.scopes == ("r1", "r2") and row.created_ms == 5
    with pytest.raises(DeviceExists):
        add_device(store, "van-1", ["r1"], 6)
    with pytest.raises(InvalidArgument):
        add_device(store, "van 2", ["r1"], 6)
    with pytest.raises(InvalidArgument):
        add_device(store, "van-2", [], 6)
    with pytest.raises(InvalidArgument):
        add_device(store, "van-2", ["r/1"], 6)
    assert [d.id for d in list_devices(store)] == ["van-1"]


def test_registry_view_follows_the_store_generation(store: Store) -> None:
    """Registry.refresh reloads only when the generation moved; disabled devices get nothing."""
    reg = Registry()
    with store.read() as txn:
        assert reg.refresh(txn) is True
        assert reg.refresh(txn) is False
    add_device(store, "van-1", ["r1"], 0)
    add_device(store, "van-2", ["r1", "r2"], 0)
    with store.read() as txn:
        assert reg.refresh(txn) is True
    assert reg.subscribers("r1") == {"van-1", "van-2"} and reg.subscribers("r2") == {"van-2"}
    set_enabled(store, "van-2", False)
    set_scopes(store, "van-1", ["r3"])
    with store.read() as txn:
        assert reg.refresh(txn) is True
    assert reg.subscribers("r1") == frozenset() and reg.subscribers("r3") == {"van-1"}
    assert reg.active("van-2") is None and reg.get("van-2") is not None


def test_remove_forgets_outcomes_and_commands(store: Store) -> None:
    """A removed device's outcomes and commands go, so a re-enrolled id starts afresh."""
    add_device(store, "van-1", ["r1"], 0)
    issue_command(store, "van-1", "wipe", 1)
    store.transact(lambda t: t.put_outcome("van-1", 1, OutcomeRow("tasks", "t", "r1", 1)))
    remove_device(store, "van-1")
    with store.read() as txn:
        assert txn.get_outcome("van-1", 1) is None
        assert txn.commands("van-1") == []
    with pytest.raises(UnknownDevice):
        remove_device(store, "van-1")
    with pytest.raises(UnknownDevice):
        set_enabled(store, "van-1", True)


def test_commands_need_a_known_device_and_command(store: Store) -> None:
    """Commands are only wipe, resync or ping, for registered devices."""
    add_device(store, "van-1", ["r1"], 0)
    with pytest.raises(InvalidArgument):
        issue_command(store, "van-1", "explode", 0)
    with pytest.raises(UnknownDevice):
        issue_command(store, "ghost", "ping", 0)
    row = issue_command(store, "van-1", "ping", 0)
    assert row.cmd == "ping" and row.id.startswith("ping-")


def _agree(store: Store, dev: str, caps: tuple[str, ...]) -> None:
    """What the device's last hello agreed to (the engine records it)."""
    def fn(txn: WriteTxn) -> None:
        row = txn.get_device(dev)
        assert row is not None
        txn.put_device(dataclasses.replace(row, caps=caps))

    store.transact(fn)


def _pending(store: Store, dev: str) -> list[str]:
    with store.read() as txn:
        return [c.cmd for c in txn.commands(dev) if not c.done_ms]


def test_enable_queues_sync_for_a_device_that_speaks_it(store: Store) -> None:
    """Enabling a disabled device with the `sync` capability queues one `sync` command
    (its held changes go at once); enabling it again while that one waits adds none."""
    add_device(store, "van-1", ["r1"], 0)
    _agree(store, "van-1", ("scopes", "sync"))
    set_enabled(store, "van-1", False)
    row, cmd = enable_device(store, "van-1", 7)
    assert row.enabled and cmd is not None and cmd.cmd == "sync" and cmd.created_ms == 7
    with store.read() as txn:
        assert txn.get_device("van-1").enabled  # type: ignore[union-attr]
        assert [c.id for c in txn.commands("van-1")] == [cmd.id]
    set_enabled(store, "van-1", False)
    assert enable_device(store, "van-1", 8)[1] is None
    assert _pending(store, "van-1") == ["sync"]


def test_enable_sends_no_sync_to_an_old_or_enabled_device(store: Store) -> None:
    """A device without the capability (or not disabled) gets no command on enable."""
    add_device(store, "old-1", ["r1"], 0)
    _agree(store, "old-1", ("scopes",))
    set_enabled(store, "old-1", False)
    row, cmd = enable_device(store, "old-1", 5)
    assert row.enabled and cmd is None and _pending(store, "old-1") == []
    add_device(store, "van-2", ["r1"], 0)
    _agree(store, "van-2", ("sync",))
    assert enable_device(store, "van-2", 5)[1] is None and _pending(store, "van-2") == []
    with pytest.raises(UnknownDevice):
        enable_device(store, "ghost", 5)
