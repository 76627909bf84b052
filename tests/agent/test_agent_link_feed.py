"""A long outage does not flood the feed (`agent.link_feed`, `Sync.record_link`): the rule
as a property over any series of link changes, and a simulated days-long outage on a
real store whose app's `local` event stays readable."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import link_feed
from agent.api import Agent
from agent.core import FEED_KEEP
from tests.agent.agentkit import FakeClock

EVERY_MS = int(link_feed.RETRY_EVENT_EVERY_S * 1000)

changes = st.lists(st.tuples(
    st.sampled_from(["online", "offline", "retrying"]),
    st.sampled_from(["", "connection_refused", "login_refused"]),
    st.integers(0, 3 * EVERY_MS)), max_size=80)
"""(state, code, ms since the previous change): a monotonic wall clock."""


def replay(series: list[tuple[str, str, int]]) -> list[tuple[int, bool]]:
    """Feed the series through the rule as `record_link` does: (time, told) per change
    that reaches meta "link" (every retry; an online/offline only when told)."""
    prior: dict[str, Any] | None = None
    now = 1_750_000_000_000
    out: list[tuple[int, bool]] = []
    for state, code, step in series:
        now += step
        told = link_feed.tell(prior, state, code, now)
        if told or state == "retrying":
            prior = {"state": state, "code": code, "t": now,
                     link_feed.TOLD_KEY: link_feed.told_at(prior, told, now)}
            out.append((now, told))
    return out


@settings(max_examples=300, deadline=None)
@given(series=changes)
def test_a_change_is_told_at_once_and_a_retry_at_a_bounded_rate(
        series: list[tuple[str, str, int]]) -> None:
    """Every change of state or code is an event; within a run of unchanged `retrying`
    the events are at least the interval apart (so at most 1 + duration / interval of
    them), and none is skipped once the interval has passed (liveness)."""
    prior: tuple[str, str] | None = None
    last_told: int | None = None
    now = 1_750_000_000_000
    prior_doc: dict[str, Any] | None = None
    for state, code, step in series:
        now += step
        told = link_feed.tell(prior_doc, state, code, now)
        key = (state, code)
        if key != prior:
            assert told, f"a change to {key} must be an event"
        elif state != "retrying":
            assert not told, "an unchanged online/offline is not recorded again"
        else:
            assert last_told is not None
            assert told == (now - last_told >= EVERY_MS)
        if told or state == "retrying":
            prior_doc = {"state": state, "code": code, "t": now,
                         link_feed.TOLD_KEY: link_feed.told_at(prior_doc, told, now)}
            prior = key
            if told:
                last_told = now


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.integers(0, EVERY_MS), min_size=1, max_size=300))
def test_an_outage_of_any_length_is_bounded(steps: list[int]) -> None:
    """Retries of one code over a duration D are at most 1 + D / interval events."""
    told = [t for t, was in replay([("retrying", "network", s) for s in steps]) if was]
    duration = sum(steps[1:])
    assert 1 <= len(told) <= 1 + duration // EVERY_MS


def test_a_clock_set_back_does_not_silence_the_feed() -> None:
    """A retry whose wall clock is before the last event's (the clock was set back) is
    told, and the interval counts from it."""
    prior = {"state": "retrying", "code": "dns", "t": 10 * EVERY_MS,
             link_feed.TOLD_KEY: 10 * EVERY_MS}
    assert link_feed.tell(prior, "retrying", "dns", 3 * EVERY_MS)
    assert not link_feed.tell(prior, "retrying", "dns", 10 * EVERY_MS + 1)


def test_a_store_from_before_counts_from_its_last_retry() -> None:
    """Meta "link" written by an older agent (no TOLD_KEY: every retry was an event)."""
    prior = {"state": "retrying", "code": "dns", "t": 5_000}
    assert not link_feed.tell(prior, "retrying", "dns", 6_000)
    assert link_feed.tell(prior, "retrying", "dns", 5_000 + EVERY_MS)
    assert link_feed.told_at(prior, False, 6_000) == 5_000


def test_days_offline_keep_the_apps_local_event(agent: Agent, clock: FakeClock) -> None:
    """A write, then FEED_KEEP + 2,000 retries 30 s apart (the backoff cap's mean: over
    four days) on the real store: status follows every retry, the feed holds a bounded
    number of `retrying` events, and the app reading from before the outage still gets
    its `local` event, with no `truncated`. The old code wrote one event per retry and
    pruned the `local` one."""
    before = agent.feed_position()
    agent.put("tasks", "t-1", {"route": "route-42", "status": "out"})
    retries = FEED_KEEP + 2_000
    reason = "cannot connect to 127.0.0.1:1: [Errno 111] Connection refused"
    for i in range(retries):
        clock.advance(30)
        agent.sync.record_link("retrying", reason, 30.0 + i % 7)
        if i % 1000 == 0:
            link = agent.link_state()
            assert link is not None and link["t"] == clock.ms  # each retry reaches status
    link = agent.link_state()
    assert link is not None and link["t"] == clock.ms and link["retry_in_s"] == 30.0 + (
        retries - 1) % 7
    got = agent.feed_after(before, limit=FEED_KEEP)
    kinds = [e.kind for e in got]
    assert kinds[0] == "local" and "truncated" not in kinds
    outage_s = retries * 30
    assert kinds.count("retrying") <= 1 + outage_s / link_feed.RETRY_EVENT_EVERY_S
