"""A live query on one device follows another device's writes through the whole fleet
(both fleets: embedded broker + LMDB server, Mosquitto + PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.query import LiveUpdate
from agent.query.live import LiveQuery
from tests.agent.query.checks import assert_indexes_consistent, assert_query_matches_reference
from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e

ROUTE = "route-42"


def _until(fleet: Fleet, live: LiveQuery, what: str,
           done: Callable[[LiveUpdate], bool]) -> LiveUpdate:
    """Poll the live query until an update satisfies `done`; returns that update."""
    found: list[LiveUpdate] = []

    def check() -> bool:
        update = live.poll()
        while update is not None:
            if done(update):
                found.append(update)
                return True
            update = live.poll()
        return False

    fleet.wait(check, 60, what=what)
    return found[0]


def test_live_query_on_one_device_sees_another_devices_write(fleet: Fleet) -> None:
    """Device B's live query (open tasks, by status) gets device A's new task as
    entered, its change as changed, and its completion as left; B's own write shows
    pending, then synced once the server acked it."""
    for dev in ("van-a", "van-b"):
        fleet.add_device(dev, [ROUTE])
    fleet.start_agents("van-a", "van-b")
    a, b = fleet.agent("van-a"), fleet.agent("van-b")
    live = b.live_query("tasks", where={"status": {"in": ["out", "late"]}}, order_by="status")
    first = live.poll()
    assert first is not None and first.initial and first.keys == []

    a.put("tasks", "t-1", {"route": ROUTE, "status": "out", "eta": 900,
                           "customer": "Hendrikse Bakery"})
    update = _until(fleet, live, "B's live query sees A's task", lambda u: u.keys == ["t-1"])
    (row,) = update.entered
    assert row.fields["customer"] == "Hendrikse Bakery"
    assert row.pending == 0 and row.version > 0, "it came from the server"

    a.put("tasks", "t-1", {"status": "late"})
    update = _until(fleet, live, "A's change reaches B",
                    lambda u: [r.fields["status"] for r in u.changed] == ["late"])
    assert update.keys == ["t-1"]

    b.put("tasks", "t-2", {"route": ROUTE, "status": "out", "eta": 100})
    update = _until(fleet, live, "B's own write", lambda u: "t-2" in u.keys)
    assert [r.key for r in update.entered] == ["t-2"] and update.entered[0].pending == 1
    update = _until(fleet, live, "B's write acked",
                    lambda u: any(r.key == "t-2" and r.pending == 0 for r in u.changed))
    assert update.keys == ["t-1", "t-2"], "ordered by status: late (t-1) < out (t-2)"

    a.put("tasks", "t-1", {"status": "delivered"})
    _until(fleet, live, "A's completed task leaves B's result", lambda u: u.left == ["t-1"])
    fleet.wait_converged("van-a", "van-b")
    for ag in (a, b):
        assert_indexes_consistent(ag)
        assert_query_matches_reference(ag, {"collection": "tasks", "where": {"route": ROUTE},
                                            "order_by": "eta"}, limit=1)
