"""Sync windows: when the link may be used for bulk work (pure logic, no clock).

A window is written ``DAYS HH:MM-HH:MM``, cron-like:

- ``DAYS``: ``*`` (every day), a day (``Mon``), a range (``Mon-Fri``, wrapping allowed:
  ``Fri-Mon``) or a comma list of those (``Mon,Wed,Sat-Sun``); English three-letter
  names, any case;
- the times are local wall-clock times; ``24:00`` ends at midnight; a window whose end
  is not after its start runs over midnight into the next day (``Mon 22:00-06:00`` is
  Monday 22:00 to Tuesday 06:00); ``00:00-24:00`` is the whole day;
- either time may also give seconds, ``HH:MM:SS`` (``Mon 22:00:30-22:45``): cron has
  no seconds, but a window a few seconds ahead is what tests and short maintenance
  slots need, and ``HH:MM`` stays the same as ``HH:MM:00``.

Several windows are open when any of them is. Everything is computed on seconds of the
week (Monday 00:00 = 0) of a local time the caller gives, so it is exact and testable
without a clock; a DST jump shifts the answer by that hour at most.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from agent.policy.errors import PolicyError

WEEK_S = 7 * 86400
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = r"(\d{1,2}):(\d{2})(?::(\d{2}))?"
_WINDOW_RE = re.compile(rf"^\s*(\S+)\s+{_TIME}\s*-\s*{_TIME}\s*$")
_HOW = ("write a sync window as 'DAYS HH:MM-HH:MM' (or HH:MM:SS), e.g. "
        "'Mon-Fri 22:00-06:00' or '* 00:00-24:00'")


@dataclass(frozen=True)
class Window:
    """One window: the days it starts on (0 = Monday) and its start and length (s)."""

    days: frozenset[int]
    start_s: int
    length_s: int
    text: str = ""

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) in seconds of the week, end possibly past WEEK_S (wraps)."""
        return [(day * 86400 + self.start_s, day * 86400 + self.start_s + self.length_s)
                for day in sorted(self.days)]


def _day(name: str, text: str) -> int:
    short = name.strip().lower()
    if short in DAY_NAMES:
        return DAY_NAMES.index(short)
    raise PolicyError(f"sync window {text!r}: {name!r} is not a day (Mon, Tue, ... Sun); "
                      f"{_HOW}")


def _days(spec: str, text: str) -> frozenset[int]:
    if spec == "*":
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        if "-" in part:
            first, _, last = part.partition("-")
            day, last_day = _day(first, text), _day(last, text)
            days.add(day)
            while day != last_day:
                day = (day + 1) % 7
                days.add(day)
        else:
            days.add(_day(part, text))
    return frozenset(days)


def _time_of_day(hours: str, minutes: str, seconds: str | None, text: str) -> int:
    """Seconds since midnight of ``HH:MM`` or ``HH:MM:SS`` (00:00 to 24:00 inclusive)."""
    h, m, s = int(hours), int(minutes), int(seconds or 0)
    if m > 59 or s > 59 or h > 24 or (h == 24 and (m, s) != (0, 0)):
        shown = f"{h:02d}:{m:02d}" + ("" if seconds is None else f":{s:02d}")
        raise PolicyError(f"sync window {text!r}: {shown} is not a time of day "
                          f"(00:00 to 24:00); {_HOW}")
    return h * 3600 + m * 60 + s


def parse_window(text: str) -> Window:
    """Parse ``DAYS HH:MM[:SS]-HH:MM[:SS]``; PolicyError saying how to write it otherwise."""
    if not isinstance(text, str) or len(text) > 200:
        raise PolicyError(f"sync window {text!r} is not a short string; {_HOW}")
    match = _WINDOW_RE.match(text)
    if match is None:
        raise PolicyError(f"sync window {text!r} is not understood; {_HOW}")
    days = _days(match.group(1), text)
    start, end = (_time_of_day(match.group(i), match.group(i + 1), match.group(i + 2), text)
                  for i in (2, 5))
    if start == 86400:
        raise PolicyError(f"sync window {text!r} starts at 24:00; start it at 00:00 of the "
                          f"next day instead")
    length = end - start if end > start else end + 86400 - start
    return Window(days, start, length, text.strip())


def parse_windows(texts: Sequence[str]) -> tuple[Window, ...]:
    return tuple(parse_window(t) for t in texts)


def week_second(local: datetime) -> int:
    """Seconds since Monday 00:00 of the week of this (local) time."""
    return local.weekday() * 86400 + local.hour * 3600 + local.minute * 60 + local.second


def is_open(windows: Sequence[Window], at_s: int) -> bool:
    """Whether a window is open at second `at_s` of the week. No windows: always open."""
    if not windows:
        return True
    at = at_s % WEEK_S
    for window in windows:
        for start, end in window.spans():
            if start <= at < end or start <= at + WEEK_S < end:
                return True
    return False


def seconds_until_change(windows: Sequence[Window], at_s: int) -> int | None:
    """Seconds from `at_s` until the windows next open (when closed now) or close (when
    open now); None when that never happens (no windows, or open all week)."""
    if not windows:
        return None
    now_open = is_open(windows, at_s)
    edges = sorted({(edge - at_s) % WEEK_S or WEEK_S
                    for window in windows for span in window.spans()
                    for edge in (span if not now_open else span[1:])})
    for ahead in edges:
        if is_open(windows, at_s + ahead) != now_open:
            return ahead
    return None


__all__ = ["DAY_NAMES", "WEEK_S", "Window", "is_open", "parse_window", "parse_windows",
           "seconds_until_change", "week_second"]
