"""The `server` feed event's rule (`agent.server_feed.transition`), pure: one event per
up/down transition of the group, whatever the sequence of policy states."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.server_feed import transition

states = st.lists(st.tuples(st.sampled_from(["main", "other"]),
                            st.sampled_from([True, False, None]),
                            st.none() | st.integers(0, 10**13)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(seq=states)
def test_one_event_per_transition(seq: list[tuple[str, bool | None, int | None]]) -> None:
    """An event exactly when (group, up) differs from the last one told; an unknown `up`
    (None) is never told and does not reset what was; `since_ms` is the side's time."""
    told: dict[str, Any] | None = None
    for group, up, since in seq:
        doc = {"group": group, "up": up, "down_since_ms": since, "up_since_ms": since}
        event = transition(told, doc)
        if up is None or (told is not None and (told["group"], told["up"]) == (group, up)):
            assert event is None
            continue
        assert event == {"group": group, "up": up, "since_ms": since}
        told = {"group": group, "up": up}


def test_nothing_without_a_policy_state() -> None:
    assert transition(None, None) is None
    assert transition({"group": "main", "up": True}, {"group": "main", "up": None}) is None
