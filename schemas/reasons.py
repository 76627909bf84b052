"""Short, human-readable reasons for refused input: they name the offending member and
never echo a large part of the input (PROTOCOL.md §8: a reason is < 300 characters)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

from pydantic import ValidationError

MAX_REASON_CHARS: Final = 300
_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_~-]{1,40}")


def validation_reason(exc: ValidationError, prefix: tuple[str | int, ...]) -> str:
    """The first error of `exc` as ``path: message``, short and without the input."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:  # pragma: no cover - pydantic always lists at least one
        return "invalid message"
    first = errors[0]
    message = _JSON_WORDING.get(first["type"]) or str(first["msg"])
    for noise in ("Value error, ", "Assertion failed, "):
        if message.startswith(noise):
            message = message[len(noise) :]
    where = (*prefix, *first["loc"])
    return clip_reason(f"{member_path(where)}: {message}" if where else message)


# pydantic words some errors in Python terms; a device developer reads JSON terms.
_JSON_WORDING: Final[dict[str, str]] = {
    "model_type": "Input should be an object",
    "model_attributes_type": "Input should be an object",
    "dict_type": "Input should be an object",
    "list_type": "Input should be an array",
    "tuple_type": "Input should be an array",
}


def member_path(where: Iterable[str | int]) -> str:
    return ".".join(show_key(part) for part in where)


def show_key(part: str | int) -> str:
    if isinstance(part, int):
        return str(part)
    if _SIMPLE_KEY.fullmatch(part):
        return part
    return show_text(part)


def show_text(text: str, limit: int = 40) -> str:
    """A short printable rendering of a string taken from the input."""
    shown = ascii(text[:limit])
    return shown + "..." if len(text) > limit else shown


def kind_of(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), "a value")


def too_large_reason(what: str, size: int, limit: int) -> str:
    return f"{what} of {size} bytes exceeds the limit of {limit} bytes"


def clip_reason(reason: str) -> str:
    """Keep reasons short and printable (they travel in `reject` and logs)."""
    reason = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in reason[:600])
    if len(reason) >= MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 4] + "..."
    return reason

__all__ = ["MAX_REASON_CHARS", "clip_reason", "kind_of", "member_path", "show_key", "show_text",
           "too_large_reason", "validation_reason"]
