"""A disabled device that stays online (issue 8 §5): it is told to wait for `waystation
device enable` (not `device add`), its writes stay on it, and however often it retries,
the server keeps no dead letter for it; enabled again, its writes arrive. Real processes
on both fleets (embedded broker + LMDB, Mosquitto + PostgreSQL)."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RETRIES = 8
"""Transient refusals to sit through: with the fleet's backoff (at most 1 s) and status
every 2 s, well past the ~10 s after which a dead letter used to appear."""


def test_disabled_online_device_waits_without_dead_letters(fleet: Fleet) -> None:
    fleet.add_device("van-1", ["route-1"])
    proc = fleet.start_agent("van-1")
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "status": "out"})
    fleet.wait_drained("van-1")
    letters_before = len(fleet.server_dead_letters())

    fleet.cli("device", "disable", "van-1", "--config", str(fleet.server_config))
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "status": "out"})

    def deferred() -> list[dict[str, object]]:
        return [e for e in proc.events("change_deferred") if e.get("code") == "device_disabled"]

    fleet.wait(lambda: len(deferred()) >= RETRIES or None, timeout=90)
    status = fleet.agent_status("van-1")
    told = json.dumps(status["last_error"])
    assert "device_disabled" in told and "waystation device enable van-1" in told
    assert "device add" not in told
    # ... and when the daemon tries the held change again (within the fleet's 1 s cap)
    assert 0 <= status["last_error"]["retry_in_s"] <= 1.0, status["last_error"]
    assert status["pending"] == 1 and status["dead_letters"] == 0
    # The operator sees the same from the server: what waits, since when, no dead letter.
    def server_view() -> dict[str, object] | None:
        out = fleet.cli("server", "devices", "--json", "--config", str(fleet.server_config))
        doc = next(d for d in json.loads(out.stdout) if d["id"] == "van-1")
        return doc if doc["pending"] == 1 and doc["pending_oldest"] else None
    seen = fleet.wait(server_view, timeout=30, what="the held change in `server devices`")
    assert seen["dead_letters"] == 0
    assert fleet.record("tasks", "t-2") is None
    letters = fleet.server_dead_letters()
    assert len(letters) == letters_before, letters
    assert not [d for d in letters if d["device"] == "van-1"]

    fleet.cli("device", "enable", "van-1", "--config", str(fleet.server_config))
    fleet.wait_drained("van-1", timeout=60)
    assert fleet.record("tasks", "t-2") is not None
    assert len(fleet.server_dead_letters()) == letters_before


LONG_BACKOFF = {"backoff_initial_s": 30.0, "backoff_max_s": 60.0}
"""A retry backoff far above how long a sync command takes to arrive, so a change acked
soon after `device enable` was not sent by the backoff running out."""


def test_enabled_device_sends_its_held_change_at_once(fleet: Fleet) -> None:
    """`device enable` queues the `sync` command for a device that speaks it: the change
    it held goes at once, well before the retry backoff the agent was in."""
    fleet.add_device("van-1", ["route-1"], sync=LONG_BACKOFF)
    proc = fleet.start_agent("van-1")
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "status": "out"})
    fleet.wait_drained("van-1")

    fleet.cli("device", "disable", "van-1", "--config", str(fleet.server_config))
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "status": "out"})
    deferred = proc.wait_event("change_deferred",
                               where=lambda e: e.get("code") == "device_disabled")
    refused_at = time.monotonic()
    backoff = float(deferred["retry_in_s"])  # what the agent itself waits, as it logged it
    assert backoff >= LONG_BACKOFF["backoff_initial_s"] - 0.1
    assert fleet.agent_status("van-1")["pending"] == 1

    out = json.loads(fleet.cli("device", "enable", "van-1", "--json", "--config",
                               str(fleet.server_config)).stdout)
    assert out["enabled"] is True and out["command"]["cmd"] == "sync", out
    fleet.wait_drained("van-1", timeout=backoff / 3)
    assert time.monotonic() - refused_at < backoff / 2
    assert fleet.record("tasks", "t-2") is not None
    proc.wait_event("command", where=lambda e: e.get("id") == out["command"]["id"])
    retried = [e for e in proc.events("change_deferred") if e.get("code") == "device_disabled"]
    assert len(retried) == 1, retried  # sent once refused, then once accepted: no retry timer
