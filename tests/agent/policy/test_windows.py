"""Sync windows: parsing, open/closed and the next change, against brute-force models."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy import PolicyError, is_open, parse_window, seconds_until_change
from agent.policy.windows import DAY_NAMES, WEEK_S, week_second

times = st.tuples(st.integers(0, 23), st.sampled_from([0, 15, 30, 59]))
seconds = st.one_of(st.none(), st.sampled_from([0, 1, 30, 59]))
"""None: the time is written HH:MM; else HH:MM:SS with these seconds."""
day_sets = st.sets(st.integers(0, 6), min_size=1, max_size=7)


def _hms(h: int, m: int, s: int | None) -> str:
    return f"{h:02d}:{m:02d}" + ("" if s is None else f":{s:02d}")


@st.composite
def windows(draw: st.DrawFn) -> str:
    """Minute windows (HH:MM-HH:MM), as cron writes them."""
    days = draw(day_sets)
    (h1, m1), (h2, m2) = draw(times), draw(times)
    names = ",".join(DAY_NAMES[d].capitalize() for d in sorted(days))
    return f"{names} {h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}"


@st.composite
def second_windows(draw: st.DrawFn) -> str:
    """Windows whose times may give seconds (HH:MM:SS), mixed with HH:MM."""
    days = draw(day_sets)
    (h1, m1), (h2, m2) = draw(times), draw(times)
    s1, s2 = draw(seconds), draw(seconds)
    names = ",".join(DAY_NAMES[d].capitalize() for d in sorted(days))
    return f"{names} {_hms(h1, m1, s1)}-{_hms(h2, m2, s2)}"


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


def second_model_open(texts: list[str], at: int) -> bool:
    """Brute force with seconds: each window's start and end from its text alone (a
    window whose end is not after its start ends the next day), then every day it starts
    on, with last week's spans too (a Sunday window runs into Monday)."""
    at %= WEEK_S
    for text in texts:
        days_part, times_part = text.split(" ")
        first, last = times_part.split("-")
        start, end = (sum(int(x) * unit for x, unit in zip(t.split(":"), (3600, 60, 1),
                                                            strict=False))
                      for t in (first, last))
        if end <= start:
            end += 86400
        for day, name in enumerate(DAY_NAMES):
            if name.capitalize() not in days_part.split(","):
                continue
            for week in (0, WEEK_S):
                if day * 86400 + start <= at + week < day * 86400 + end:
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


def test_seconds_examples() -> None:
    """HH:MM:SS (a product extension of the cron-like form) counts to the second; HH:MM
    is HH:MM:00; 24:00:00 ends the day like 24:00."""
    w = parse_window("Tue 10:00:30-10:01:15")
    assert w.days == frozenset({1}) and w.start_s == 36030 and w.length_s == 45
    at = 86400 + 36000
    assert not is_open([w], at + 29) and is_open([w], at + 30)
    assert is_open([w], at + 74) and not is_open([w], at + 75)
    assert seconds_until_change([w], at + 10) == 20
    assert seconds_until_change([w], at + 30) == 45
    a, b = parse_window("Mon 22:00:00-06:00"), parse_window("Mon 22:00-06:00:00")
    assert ((a.days, a.start_s, a.length_s) == (b.days, b.start_s, b.length_s)
            == (frozenset({0}), 79200, 8 * 3600))
    assert parse_window("* 23:59:59-24:00:00").length_s == 1
    assert parse_window("Sun 23:59:30-00:00:30").spans() == [(WEEK_S - 30, WEEK_S + 30)]


@pytest.mark.parametrize("text", ["", "Mon", "Mon 25:00-26:00", "Mon 10:60-11:00",
                                  "Fry 10:00-11:00", "Mon-Fry 10:00-11:00",
                                  "Mon 24:00-01:00", "x" * 300, "Mon 10:00 11:00",
                                  "Mon 10:00:60-11:00", "Mon 10:00-24:00:01",
                                  "Mon 24:00:00-01:00", "Mon 10:00:5-11:00",
                                  "Mon 10:00:00:00-11:00"])
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


@settings(max_examples=150, deadline=None)
@given(st.lists(second_windows(), min_size=1, max_size=3), st.integers(0, WEEK_S - 1))
def test_open_with_seconds_matches_model(texts: list[str], at: int) -> None:
    """With seconds, is_open agrees with a model that reads the text itself, at the
    drawn second and at the second before and after each window edge."""
    ws = [parse_window(t) for t in texts]
    edges = {edge % WEEK_S for w in ws for span in w.spans() for edge in span}
    for t in {at} | {e + d for e in edges for d in (-1, 0, 1)}:
        assert is_open(ws, t) == second_model_open(texts, t), (texts, t)


@settings(max_examples=150, deadline=None)
@given(st.lists(second_windows(), min_size=1, max_size=3), st.integers(0, WEEK_S - 1))
def test_next_change_with_seconds_is_the_first(texts: list[str], at: int) -> None:
    """With seconds: the state (by the model) flips exactly after seconds_until_change,
    and at no window edge, nor a second either side of one, before that."""
    ws = [parse_window(t) for t in texts]
    now = second_model_open(texts, at)
    ahead = seconds_until_change(ws, at)
    if ahead is None:
        assert now and all(second_model_open(texts, m) for m in range(0, WEEK_S, 60))
        return
    assert 0 < ahead <= WEEK_S
    assert second_model_open(texts, at + ahead) != now
    edges = {edge % WEEK_S for w in ws for span in w.spans() for edge in span}
    for e in edges:
        for d in (-1, 0, 1):
            t = at + (e + d - at) % WEEK_S
            if at <= t < at + ahead:
                assert second_model_open(texts, t) == now, (texts, at, t)
