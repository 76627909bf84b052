"""Sync windows: parsing, open/closed and the next change, against a brute-force model."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy import PolicyError, is_open, parse_window, seconds_until_change
from agent.policy.windows import DAY_NAMES, WEEK_S, week_second

times = st.tuples(st.integers(0, 23), st.sampled_from([0, 15, 30, 59]))
day_sets = st.sets(st.integers(0, 6), min_size=1, max_size=7)


@st.composite
def windows(draw: st.DrawFn) -> str:
    days = draw(day_sets)
    (h1, m1), (h2, m2) = draw(times), draw(times)
    names = ",".join(DAY_NAMES[d].capitalize() for d in sorted(days))
    return f"{names} {h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}"


def model_open(texts: list[str], at: int) -> bool:
    """Brute force: minute by minute from each window's start."""
    at %= WEEK_S
    for text in texts:
        w = parse_window(text)
        for day in w.days:
            for offset in range(0, w.length_s, 60):
                if (day * 86400 + w.start_s + offset) % WEEK_S == at - at % 60:
                    return True
    return False


def test_examples() -> None:
    """The documented forms parse, with wrap-around over midnight and the week."""
    w = parse_window("Mon-Fri 22:00-06:00")
    assert w.days == frozenset(range(5)) and w.start_s == 79200 and w.length_s == 8 * 3600
    assert parse_window("* 00:00-24:00").length_s == 86400
    assert parse_window("fri-mon 10:00-11:00").days == frozenset({4, 5, 6, 0})
    tue_3am = week_second(datetime(2026, 12, 1, 3, 0))  # a Tuesday
    assert is_open([w], tue_3am)
    sat_3am = week_second(datetime(2026, 12, 5, 3, 0))  # Saturday: Friday's night window
    assert is_open([w], sat_3am)
    assert not is_open([w], week_second(datetime(2026, 12, 6, 3, 0)))  # Sunday 3:00
    assert seconds_until_change([w], week_second(datetime(2026, 12, 1, 12, 0))) == 10 * 3600


@pytest.mark.parametrize("text", ["", "Mon", "Mon 25:00-26:00", "Mon 10:60-11:00",
                                  "Fry 10:00-11:00", "Mon-Fry 10:00-11:00",
                                  "Mon 24:00-01:00", "x" * 300, "Mon 10:00 11:00"])
def test_bad_windows_say_how(text: str) -> None:
    """A wrong window is refused with the form to write."""
    with pytest.raises(PolicyError, match=r"DAYS HH:MM-HH:MM|not a day|24:00"):
        parse_window(text)


def test_no_windows_always_open() -> None:
    assert is_open([], 12345) and seconds_until_change([], 12345) is None


@settings(max_examples=150, deadline=None)
@given(st.lists(windows(), min_size=1, max_size=3), st.integers(0, WEEK_S - 1))
def test_open_matches_model(texts: list[str], at: int) -> None:
    """is_open agrees with a minute-by-minute model of the windows."""
    ws = [parse_window(t) for t in texts]
    assert is_open(ws, at) == model_open(texts, at)


@settings(max_examples=150, deadline=None)
@given(st.lists(windows(), min_size=1, max_size=3), st.integers(0, WEEK_S - 1))
def test_next_change_is_the_first(texts: list[str], at: int) -> None:
    """The state flips exactly after seconds_until_change and not at any minute before."""
    ws = [parse_window(t) for t in texts]
    now = is_open(ws, at)
    ahead = seconds_until_change(ws, at)
    if ahead is None:
        assert now and all(is_open(ws, m) for m in range(0, WEEK_S, 60))
        return
    assert 0 < ahead <= WEEK_S
    assert is_open(ws, at + ahead) != now
    first_minute = at - at % 60 + 60
    for t in range(first_minute, at + ahead, 60):
        assert is_open(ws, t) == now
