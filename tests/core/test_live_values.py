"""`merge.live_values` (the scan's fast read of a stored state, used by fetch by query)
says exactly what `from_json(...).values()` says of every record never deleted, and
defers (None) on every record that holds a delete, whatever the merge history."""

from __future__ import annotations

from hypothesis import given

from tests.core.test_merge_properties import SETTINGS, History, histories, replay
from waystation.merge import from_json, live_values, to_json


@SETTINGS
@given(histories())
def test_live_values_agree_with_the_parsed_record(history: History) -> None:
    server = replay(history.items)
    for rec in server.records.values():
        stored = to_json(rec)
        fast = live_values(stored)
        if rec.xh is not None:
            assert fast is None
        else:
            assert fast == from_json(stored).values()


def test_damaged_or_foreign_states_defer_to_from_json() -> None:
    assert live_values({"fv": 999, "f": {}}) is None
    assert live_values({"fv": 1, "f": {"a": ["z", 1, 2]}}) is None
    assert live_values({"fv": 1, "f": {"a": ["r", 1]}}) is None
    assert live_values({"fv": 1}) is None
