"""Printing for people and for programs: tables, ages, times, and `--json` documents.

Every command that prints data prints either a table for people or, with `--json`, ONE
JSON document on stdout (stable keys, UTF-8, indented), so scripts can parse it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from waystation.timefmt import ago, iso


def print_json(doc: Any) -> None:
    """Print `doc` as one JSON document on stdout (non-JSON values as strings)."""
    print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as left-aligned columns under `headers`."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def short(value: Any, limit: int = 40) -> str:
    """`value` as JSON, cut to `limit` characters with "..." when longer."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["ago", "iso", "print_json", "short", "table"]
