"""Printing for people and for programs: tables, ages, times, and `--json` documents.

Every command that prints data prints either a table for people or, with `--json`, ONE
JSON document on stdout (stable keys, UTF-8, indented), so scripts can parse it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from waystation.cli.terminal import terminal_safe
from waystation.timefmt import ago, iso


def print_json(doc: Any) -> None:
    """Print `doc` as one JSON document on stdout (non-JSON values as strings); what a
    terminal would act on is written as a JSON escape (C0 codes json escapes itself; DEL,
    C1 codes and bidirectional overrides here), so it parses to the original text."""
    # json escapes C0 codes itself; `terminal_safe` writes the rest as \uXXXX
    print(terminal_safe(json.dumps(doc, indent=2, ensure_ascii=False, default=str)))


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters (ANSI escapes, newlines, C1 codes)
    and bidirectional overrides written as escapes (`\\x1b`, `\\u202e`). Cells come
    from devices too (a hello's agent string, record values): printed raw, one could
    clear the operator's screen or forge table lines."""
    return terminal_safe(text, one_line=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "") -> None:
    """Print rows as left-aligned columns under `headers` (cells made `printable`), each
    line after `indent` (a table nested under a heading of its own)."""
    cells = [[str(h) for h in headers]] + [[printable(str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def short(value: Any, limit: int = 40) -> str:
    """`value` as JSON, cut to `limit` characters with "..." when longer."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["ago", "iso", "print_json", "printable", "short", "table"]
