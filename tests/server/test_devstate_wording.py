"""The STATE column of `server devices` (`broker.server.devstate.presence`): a device
that never reached a server, and one running a store other than its first."""

from __future__ import annotations

from dataclasses import replace

from broker.server import devstate
from broker.server.store.base import DeviceRow

T = 1_796_500_000_000


def test_a_device_never_heard_from_is_not_just_offline() -> None:
    row = DeviceRow("van-1", ("r1",), created_ms=T)
    assert devstate.presence(row) == "never connected"
    assert devstate.presence(replace(row, enabled=False)) == "never connected, disabled"
    seen = DeviceRow("van-2", ("r1",), created_ms=T, last_seen_ms=T + 5000)
    assert devstate.presence(seen) == "offline"


def test_a_recreated_store_is_named_with_its_time() -> None:
    row = DeviceRow("van-1", ("r1",), last_seen_ms=T, online=True, inc="abc",
                    inc_ms=T, incs=1)
    assert devstate.presence(row) == "online"
    state = devstate.presence(replace(row, incs=2, inc_ms=T + 60_000))
    assert state.startswith("online, store re-created at ")
    assert devstate.iso(T + 60_000) in state and "2 stores seen" in state


def test_the_store_a_wipe_made_is_the_wipe_s() -> None:
    """After a remote wipe the device runs a new store: "wiped at T" says why."""
    row = DeviceRow("van-1", ("r1",), last_seen_ms=T, online=True, inc="abc",
                    inc_ms=T + 2000, incs=2, wipe_id="wipe-1", wipe_ms=T,
                    wipe_done_ms=T + 1000, enabled=False)
    state = devstate.presence(row)
    assert "wiped at" in state and "re-created" not in state


def test_a_checkpoint_that_looks_behind_says_how_old_the_report_is() -> None:
    """Checkpoints are reported at connect and catch-up, not as live changes arrive: a
    device that looks behind shows the report's age; one level with the sequence not."""
    row = DeviceRow("van-1", ("r1", "r2"), last_seen_ms=T, online=True,
                    cp={"r1": 120, "r2": 7}, cp_ms=T)
    now = T + 3 * 3_600_000
    assert devstate.progress(row, {"r1": 5000, "r2": 7}, now) == (
        "r1 120/5000, r2 7/7 (reported 3h ago)")
    assert devstate.progress(row, {"r1": 120, "r2": 7}, now) == "r1 120/120, r2 7/7"
