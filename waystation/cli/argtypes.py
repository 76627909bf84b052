"""Argument types of the parser: values, FIELD=VALUE pairs, numbers, device ids."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any


def parse_value(text: str) -> Any:
    """A command-line VALUE: JSON when it parses as JSON, else the text itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def assignment(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return name, parse_value(value)


def number(text: str) -> int | float:
    value = parse_value(text)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def _identifier(kind: str, text: str) -> str:
    import re

    from waystation.config import ID_PATTERN

    if not re.fullmatch(ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{shown(text)} is not a valid {kind}: use 1 to 64 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit")
    return text


def shown(text: str, limit: int = 70) -> str:
    """`text` quoted for an error message: control characters escaped (`repr`), and cut
    to its first `limit` characters, so that a pasted megabyte does not flood the
    terminal."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def device_id(text: str) -> str:
    return _identifier("device id", text)


def scope_id(text: str) -> str:
    return _identifier("scope", text)


def server_id(text: str) -> str:
    """A merge server's id (`server_id` of its config, which takes the same pattern)."""
    return _identifier("server id", text)


def positive_int(text: str) -> int:
    """A count such as --limit: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {shown(text)}"
                                         ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def int_between(low: int, high: int, unit: str = "") -> Callable[[str], int]:
    """An argument type for a whole number from `low` to `high` (ASCII digits only: no
    sign, exponent, fraction or separators), e.g. `--stale-after SECONDS`."""
    what = f" {unit}" if unit else ""

    def parse(text: str) -> int:
        digits = text.strip()
        if not re.fullmatch(r"[0-9]{1,20}", digits):
            raise argparse.ArgumentTypeError(
                f"expected a whole number{what} from {low} to {high}, got {shown(text)}")
        value = int(digits)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be from {low} to {high}{what}, got {shown(digits)}")
        return value

    return parse


_DURATION_RE = re.compile(r"^(\d{1,9})([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> int:
    """`--retire-after`: seconds, or a number with s, m, h or d (`12h`, `7d`)."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use seconds or a "
                                         "number with s, m, h or d, e.g. 7d")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


__all__ = ["assignment", "device_id", "duration_s", "int_between", "number", "parse_value",
           "positive_int", "scope_id", "server_id", "shown"]
