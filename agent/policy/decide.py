"""What may use the link now, and why the rest waits (pure logic, no I/O).

The daemon gathers `Conditions` (time, sync windows, probes, server announcement, an
explicit "sync now") and asks `decide()`; the answer says which lanes may send their
normal work, whether high-priority changes may go, and every deferral with its reason
and, where known, until when. Rules, in order:

1. The merge server group is announced down: nothing is sent (it would only fill the
   broker's queues); "sync now" does not change that.
2. High-priority changes (priority >= `Rules.high_priority`) are never held by windows,
   metered links, budgets or the battery.
3. "sync now" (from the app or the operator, until a time) lifts windows, the metered
   policy, the day's budget and the battery threshold for everything.
4. Otherwise: a closed window holds every lane; a metered link lets only
   `Rules.metered_lanes` through (records by default) and, with a day's budget, nothing
   once it is spent; a battery below its threshold and not charging holds the bulk
   lanes (`Rules.bulk_lanes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Lane = Literal["records", "files", "telemetry"]
LANES: tuple[Lane, ...] = ("records", "files", "telemetry")


@dataclass(frozen=True)
class Battery:
    percent: float
    charging: bool


@dataclass(frozen=True)
class Rules:
    """The device's policy, from `waystation.config.policy.PolicyConfig`."""

    high_priority: int = 100
    metered_lanes: frozenset[Lane] = frozenset({"records"})
    battery_min_percent: float | None = None
    bulk_lanes: frozenset[Lane] = frozenset({"records", "files"})


@dataclass(frozen=True)
class Conditions:
    now_ms: int
    window_open: bool = True
    window_change_ms: int | None = None
    """When the windows next open (closed now) or close (open now); None: never."""
    metered: bool | None = None
    """None: unknown (no probe, or the probe failed): treated as not metered."""
    budget_left: int | None = None
    """Bytes left of today's metered budget (None: no budget)."""
    budget_resets_ms: int | None = None
    battery: Battery | None = None
    server_up: bool | None = None
    """None: no server announcement seen (an old server): not a reason to wait."""
    server_down_since_ms: int | None = None
    sync_now_until_ms: int | None = None


@dataclass(frozen=True)
class Deferral:
    code: Literal["server_unavailable", "window_closed", "metered", "budget_spent",
                  "battery_low"]
    reason: str
    lanes: tuple[Lane, ...]
    until_ms: int | None = None
    """When it ends by itself, if known."""
    since_ms: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "reason": self.reason, "lanes": list(self.lanes),
                "until_ms": self.until_ms, "since_ms": self.since_ms}


@dataclass(frozen=True)
class Decision:
    lanes: frozenset[Lane]
    """Lanes whose normal work may be sent now."""
    high_priority: bool
    """High-priority changes may be sent now."""
    deferrals: tuple[Deferral, ...] = field(default=())
    sync_now: bool = False

    def may_send(self, lane: Lane, *, high: bool = False) -> bool:
        return lane in self.lanes or (high and self.high_priority)

    def held(self, lane: Lane) -> tuple[Deferral, ...]:
        """The deferrals holding this lane's normal work."""
        return tuple(d for d in self.deferrals if lane in d.lanes)


def decide(rules: Rules, cond: Conditions) -> Decision:
    """Which lanes may send now, and why the others wait (see the module text)."""
    if cond.server_up is False:
        return Decision(frozenset(), False, (Deferral(
            "server_unavailable", "no merge server is up: the server group announced it "
            "is down; sending resumes when a server announces itself", LANES,
            since_ms=cond.server_down_since_ms),))
    if cond.sync_now_until_ms is not None and cond.now_ms < cond.sync_now_until_ms:
        return Decision(frozenset(LANES), True, (), sync_now=True)
    open_lanes: set[Lane] = set(LANES)
    deferrals: list[Deferral] = []
    if not cond.window_open:
        deferrals.append(Deferral("window_closed", "outside the sync windows", LANES,
                                  until_ms=cond.window_change_ms))
        open_lanes.clear()
    if cond.metered:
        held = tuple(lane for lane in LANES if lane not in rules.metered_lanes)
        if held:
            deferrals.append(Deferral("metered", "the link is metered: only "
                                      + ", ".join(sorted(rules.metered_lanes)) + " go",
                                      held))
        if cond.budget_left is not None and cond.budget_left <= 0:
            deferrals.append(Deferral("budget_spent", "today's byte budget for the "
                                      "metered link is spent", LANES,
                                      until_ms=cond.budget_resets_ms))
            held = LANES
        open_lanes.difference_update(held)
    battery = cond.battery
    if (battery is not None and rules.battery_min_percent is not None
            and not battery.charging and battery.percent < rules.battery_min_percent):
        held = tuple(lane for lane in LANES if lane in rules.bulk_lanes)
        deferrals.append(Deferral("battery_low", f"battery at {battery.percent:.0f} % "
                                  f"(below {rules.battery_min_percent:.0f} %) and not "
                                  "charging", held))
        open_lanes.difference_update(held)
    return Decision(frozenset(open_lanes), True, tuple(deferrals))


__all__ = ["LANES", "Battery", "Conditions", "Decision", "Deferral", "Lane", "Rules",
           "decide"]
