"""Reading back what `waystation.cli.output.table` prints, so a test asserts on cells
under their headers, not on spacing."""

from __future__ import annotations

import re


def table_rows(text: str, first: str) -> list[dict[str, str]]:
    """The rows of the table in `text` whose header line starts with the column `first`,
    each as {header: cell}; the table ends at the first blank line. Columns are
    left-aligned under their headers (headers hold no double space), so a column's
    cells start where its header does."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(first + " "))
    starts = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", lines[at])]
    rows = []
    for line in lines[at + 1:]:
        if not line.strip():
            break
        ends = [s for s, _ in starts[1:]] + [len(line)]
        rows.append({name: line[s:e].strip() for (s, name), e in zip(starts, ends, strict=True)})
    return rows


__all__ = ["table_rows"]
