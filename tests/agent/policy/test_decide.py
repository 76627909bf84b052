"""The policy decision: who may send, and every held lane has a visible reason."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.policy import LANES, Battery, Conditions, Rules, decide

lanes = st.sets(st.sampled_from(LANES)).map(frozenset)
rules = st.builds(Rules, high_priority=st.integers(0, 200), metered_lanes=lanes,
                  battery_min_percent=st.none() | st.floats(0, 100), bulk_lanes=lanes)
conditions = st.builds(
    Conditions, now_ms=st.integers(0, 10**13), window_open=st.booleans(),
    window_change_ms=st.none() | st.integers(0, 10**13), metered=st.none() | st.booleans(),
    budget_left=st.none() | st.integers(-10, 10**6),
    battery=st.none() | st.builds(Battery, st.floats(0, 100), st.booleans()),
    server_up=st.none() | st.booleans(), server_down_since_ms=st.none() | st.integers(0),
    sync_now_until_ms=st.none() | st.integers(0, 10**13))


@given(rules, conditions)
def test_every_held_lane_has_a_reason(r: Rules, c: Conditions) -> None:
    """A lane that may not send is named by at least one deferral."""
    d = decide(r, c)
    for lane in LANES:
        if lane not in d.lanes:
            assert d.held(lane), (lane, d)


@given(rules, conditions)
def test_server_down_holds_everything(r: Rules, c: Conditions) -> None:
    """While the server group is announced down nothing is sent, not even urgent work."""
    d = decide(r, c)
    if c.server_up is False:
        assert not d.lanes and not d.high_priority
        assert [x.code for x in d.deferrals] == ["server_unavailable"]
    else:
        assert d.high_priority  # high priority is never held by device-side policy


@given(rules, conditions)
def test_sync_now_lifts_device_limits(r: Rules, c: Conditions) -> None:
    d = decide(r, c)
    if c.server_up is not False and c.sync_now_until_ms is not None and (
            c.now_ms < c.sync_now_until_ms):
        assert d.lanes == frozenset(LANES) and d.sync_now and not d.deferrals


@given(rules, conditions)
def test_limits(r: Rules, c: Conditions) -> None:
    """Closed window: nothing bulk; metered: only its lanes; spent budget: nothing bulk;
    low battery on battery power: no bulk lane."""
    d = decide(r, c)
    if d.sync_now or c.server_up is False:
        return
    if not c.window_open:
        assert not d.lanes
        assert any(x.code == "window_closed" and x.until_ms == c.window_change_ms
                   for x in d.deferrals)
    if c.metered:
        assert d.lanes <= r.metered_lanes
        if c.budget_left is not None and c.budget_left <= 0:
            assert not d.lanes
    else:
        assert not any(x.code in ("metered", "budget_spent") for x in d.deferrals)
    b = c.battery
    low = (b is not None and r.battery_min_percent is not None and not b.charging
           and b.percent < r.battery_min_percent)
    assert any(x.code == "battery_low" for x in d.deferrals) == low
    if low:
        assert not (d.lanes & r.bulk_lanes)


def test_plain_device_sends_everything() -> None:
    d = decide(Rules(), Conditions(now_ms=0))
    assert d.lanes == frozenset(LANES) and not d.deferrals
