"""Times as people read them in status lines and tables (shared by the CLI and the
server's device views)."""

from __future__ import annotations

import time


def ago(ms: int, now: int) -> str:
    """How long before `now` the time `ms` (both ms since the epoch) was; 0 is "never"."""
    if not ms:
        return "never"
    secs = max(0, (now - ms) // 1000)
    if secs < 60:
        return f"{secs}s ago"
    if secs < 3600:
        return f"{secs // 60}m ago"
    if secs < 86400:
        return f"{secs // 3600}h ago"
    return f"{secs // 86400}d ago"


def span(ms: int) -> str:
    """A duration of `ms` milliseconds in words ("45 s", "3 min", "5 h", "2 days")."""
    secs = max(0, ms) // 1000
    if secs < 120:
        return f"{secs} s"
    if secs < 7200:
        return f"{secs // 60} min"
    if secs < 172800:
        return f"{secs // 3600} h"
    return f"{secs // 86400} days"


def about(ms: int) -> str:
    """A measured amount of `ms` milliseconds in words, rounded to the nearest unit ("3 h"
    for 2 h 59 min 59.9 s), where `span` truncates: for an offset a measure makes
    slightly smaller than it is (a clock exactly 3 h ahead, measured less the message's
    transit, is "3 h ahead", not "2 h")."""
    secs = round(max(0, ms) / 1000)
    if secs < 120:
        return f"{secs} s"
    if round(secs / 60) < 120:
        return f"{round(secs / 60)} min"
    if round(secs / 3600) < 48:
        return f"{round(secs / 3600)} h"
    return f"{round(secs / 86400)} days"


def iso(ms: int) -> str:
    """`ms` since the epoch as an ISO 8601 UTC time; 0 is the empty string."""
    if not ms:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def year(ms: int) -> int:
    """The (UTC) year of `ms` since the epoch."""
    return time.gmtime(ms / 1000).tm_year


__all__ = ["about", "ago", "iso", "span", "year"]
