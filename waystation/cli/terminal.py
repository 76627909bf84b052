"""What the command line prints is safe for the operator's terminal.

Devices choose much of what the CLI shows: record values, a hello's agent string, the
reasons and payloads of their dead letters. Tables escape their cells
(`output.printable`), but free text printed outside a table (`server get`'s `key: value`
lines, a dead letter's reason, a conflict's values) went to the terminal raw: an ANSI
escape in a record could clear the screen, retitle the window or forge lines of output,
and a bidirectional override could make text read backwards. `TerminalSafe` wraps the
command's stdout and escapes control characters other than newline and tab, C1 codes
and bidirectional overrides (`\\x1b`, `\\u009b`, `\\u202e`).
`--json` documents are escaped by `output.print_json` itself (as JSON `\\uXXXX`, so they
still parse to the original text). Daemons (`... run`, `demo`) print their own logs and
are not wrapped.
"""

from __future__ import annotations

import io
import re
from typing import Any, TextIO

_BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")
_UNSAFE_IN_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_C0_NAMED = {0x09: "\\t", 0x0a: "\\n", 0x0d: "\\r"}


def _escape(match: re.Match[str]) -> str:
    # C0 codes as \x1b; the rest as \u009b: valid inside a JSON string too, so JSON
    # lines a command prints (`agent watch`) still parse to the original text.
    ch = ord(match.group())
    if ch < 0x20:
        return _C0_NAMED.get(ch) or f"\\x{ch:02x}"
    return f"\\u{ch:04x}"


def terminal_safe(text: str, *, one_line: bool = False) -> str:
    """`text` with what a terminal would act on escaped; newlines and tabs kept unless
    `one_line` (a table cell: a newline in it would forge a row)."""
    return (_UNSAFE_IN_LINE if one_line else _UNSAFE).sub(_escape, text)


class TerminalSafe(io.TextIOBase):
    """A text stream that writes `terminal_safe` text to `raw` (binary writes, through
    `buffer`, and file descriptors pass untouched: those are data for programs)."""

    def __init__(self, raw: TextIO) -> None:
        super().__init__()
        self._raw = raw

    def write(self, text: str) -> int:
        self._raw.write(terminal_safe(text))
        return len(text)

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def isatty(self) -> bool:
        return self._raw.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._raw.encoding

    @property
    def buffer(self) -> Any:
        return self._raw.buffer


__all__ = ["TerminalSafe", "terminal_safe"]
