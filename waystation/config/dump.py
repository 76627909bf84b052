"""Writing a config back out as TOML (secrets masked)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    SecretStr,
)

from waystation.config.common import *  # noqa: F403
from waystation.config.common import MASK

# --------------------------------------------------------------------------- dumping

def dump_toml(config: BaseModel, *, mask_secrets: bool = True, exclude_defaults: bool = False,
              header: str | None = None) -> str:
    """`config` as a TOML document that `load_config` reads back to an equal config.

    Secrets (passwords, the password in a store URL) are masked unless
    `mask_secrets=False`. `exclude_defaults` leaves out settings at their default.
    `header` becomes leading `#` comment lines.
    """
    lines: list[str] = []
    if header:
        lines.extend(f"# {line}".rstrip() for line in header.splitlines())
        lines.append("")
    body = _dump_table(config, (), mask_secrets, exclude_defaults)
    lines.extend(body)
    while lines and lines[0] == "":
        lines.pop(0)
    return "\n".join(lines).rstrip("\n") + "\n"


def _dump_table(model: BaseModel, path: tuple[str, ...], mask: bool, exclude: bool) -> list[str]:
    scalars: list[str] = []
    tables: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        default = field.get_default(call_default_factory=True)
        if exclude and value == default:
            continue
        if isinstance(value, BaseModel):
            sub = _dump_table(value, (*path, name), mask, exclude)
            if sub:
                tables.append("")
                tables.extend(sub)
            continue
        if value is None:
            if default is not None:
                scalars.append(f"{_toml_key(name)} = false")
            continue
        if isinstance(value, SecretStr):
            value = MASK if mask else value.get_secret_value()
        elif name == "url" and isinstance(value, str) and mask:
            value = _mask_url(value)
        scalars.append(f"{_toml_key(name)} = {_toml_scalar(value)}")
    if not scalars and not tables:
        return []
    out: list[str] = []
    if path and (scalars or not tables):
        out.append("[" + ".".join(_toml_key(p) for p in path) + "]")
    out.extend(scalars)
    out.extend(tables)
    return out


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, SecretStr):
        return _toml_string(MASK)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_scalar(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
            "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _mask_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{netloc[1]}"))
