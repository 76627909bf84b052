"""`agent status` of a wiped device: "wiped, the server sends no data until enabled"
holds only until the operator enables it again; once the device has synced after the
wipe (the server answers a wiped device nothing until then) the status says so instead
of repeating a hold that is over."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.status import AgentStatus

WIPED_AT = 1_760_000_000_000


def _status(last_sync_ms: int | None, wiped: dict[str, Any] | None) -> AgentStatus:
    return AgentStatus(
        device_id="van-1", online=True, pending=0, oldest_pending_age_s=None,
        last_sync_age_s=None if last_sync_ms is None else 1.0, last_sync_ms=last_sync_ms,
        dead_letters=0, open_conflicts=0, lost_writes=0, checkpoints={"r1": 0}, gaps=[],
        snapshots=[], heartbeat_age_s=0.5, last_error=None, next_n=1, schema_version=1,
        wiped=wiped)


@pytest.mark.parametrize(("last_sync_ms", "held"), [
    (None, True),                 # never synced since the new store began
    (WIPED_AT - 5_000, True),     # cannot happen on a new store, but not "enabled"
    (WIPED_AT + 60_000, False),   # enabled again and synced
])
def test_wipe_hold_shown_only_until_a_sync_after_it(last_sync_ms: int | None,
                                                     held: bool) -> None:
    status = _status(last_sync_ms, {"t": WIPED_AT, "id": "wipe-1", "key_destroyed": False})
    assert status.synced_since_wipe is not held
    assert ("this device was wiped by the operator" in status.summary()) is held


def test_never_wiped() -> None:
    status = _status(WIPED_AT, None)
    assert not status.synced_since_wipe and "wiped" not in status.summary()


def test_a_held_wiped_device_names_the_command_that_ends_the_hold() -> None:
    """Offline since its wipe, the device has no word from the server: its own status
    says what ends the hold."""
    status = _status(None, {"t": WIPED_AT, "id": "wipe-1", "key_destroyed": False})
    assert "`waystation device enable van-1` on the server" in status.summary()
    # Once the server said "disabled" (its reason names the command), not twice
    said = replace(status, last_error={
        "code": "device_disabled", "t": WIPED_AT + 1, "reason": "device 'van-1' is "
        "disabled by the operator: ... (`waystation device enable van-1`)"})
    assert said.summary().count("waystation device enable van-1") == 1
