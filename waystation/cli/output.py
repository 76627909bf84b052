"""Printing for people and for programs: tables, ages, times, and `--json` documents.

Every command that prints data prints either a table for people or, with `--json`, ONE
JSON document on stdout (stable keys, UTF-8, indented), so scripts can parse it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any


def print_json(doc: Any) -> None:
    """Print `doc` as one JSON document on stdout (non-JSON values as strings)."""
    print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as left-aligned columns under `headers`."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


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


def iso(ms: int) -> str:
    """`ms` since the epoch as an ISO 8601 UTC time; 0 is the empty string."""
    if not ms:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def short(value: Any, limit: int = 40) -> str:
    """`value` as JSON, cut to `limit` characters with "..." when longer."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["ago", "iso", "print_json", "short", "table"]
