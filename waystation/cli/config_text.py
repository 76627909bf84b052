"""`config show`'s text: the effective config as TOML, with every optional setting that
is unset shown as a comment, so an operator sees that metrics_port, encryption_key_file
or the TLS files exist and what they default to.

`dump_toml` writes the settings that have a value; `unset_comments` lists, per table, a
commented line for each optional key left unset (and a commented block for an optional
table such as ``[mqtt.tls]``); `annotate` puts each table's comments after its settings.
Pure functions: no I/O. Comments never change what the text loads back to.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

Section = tuple[str, ...]

_UNSET = "unset by default"

# What leaving a key unset means, where it is more than "nothing" (dotted key path).
MEANING: dict[str, str] = {
    "metrics_port": "no metrics endpoint",
    "schema_file": "the bundled example schema",
    "shared_group": "one server; set it on Mosquitto/EMQX to run several",
    "tls_port": "no TLS listener",
    "password_file": "<data_dir>/passwd",
    "store.url": "needed with kind = \"postgres\"",
    "mqtt.username": "the device id",
    "mqtt.tls": "plain TCP",
    "tls": "no TLS listener",
    "storage.encryption_key_file": "records are stored unencrypted",
    "api.tcp_port": "no TCP listener, the Unix socket only",
    "enrol.broker_host": "the server's mqtt.host",
    "enrol.broker_port": "the server's mqtt.port",
    "enrol.password_file": "the broker config's password_file",
    "enrol.ca_file": "devices connect without TLS",
}


def _unset(dotted: str) -> str:
    meaning = MEANING.get(dotted)
    return f"{_UNSET}: {meaning}" if meaning else _UNSET


def unset_comments(config: BaseModel) -> dict[Section, list[str]]:
    """Section path -> commented lines for its optional settings that are unset."""
    out: dict[Section, list[str]] = {}
    _walk(config, (), out)
    return out


def _walk(model: BaseModel, path: Section, out: dict[Section, list[str]]) -> None:
    blocks: list[str] = []  # optional tables after the keys, so no key looks inside one
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _walk(value, (*path, name), out)
            continue
        if value is not None or field.get_default(call_default_factory=True) is not None:
            continue
        dotted = ".".join((*path, name))
        sub = _model_class(field.annotation)
        if sub is None:
            out.setdefault(path, []).append(
                f"# {name} = {_placeholder(field.annotation)}  ({_unset(dotted)})")
        else:
            blocks.append(f"# [{dotted}]  (optional table, {_unset(dotted)})")
            blocks += _fields_of(sub)
    if blocks:
        out.setdefault(path, []).extend(blocks)


def _fields_of(model: type[BaseModel]) -> list[str]:
    """A commented template of every field of an optional table."""
    lines = []
    for name, field in model.model_fields.items():
        if field.is_required():
            lines.append(f"# {name} = {_placeholder(field.annotation)}  (required in this table)")
            continue
        default = field.get_default(call_default_factory=True)
        shown = _placeholder(field.annotation) if default is None else _literal(default)
        lines.append(f"# {name} = {shown}" + (f"  ({_UNSET})" if default is None else ""))
    return lines


def _model_class(annotation: Any) -> type[BaseModel] | None:
    for arg in _args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _args(annotation: Any) -> list[Any]:
    """The types an annotation admits (Optional/Union and Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _args(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [t for arg in typing.get_args(annotation) for t in _args(arg)]
    return [annotation]


def _placeholder(annotation: Any) -> str:
    kinds = [a for a in _args(annotation) if a is not type(None)]
    kind = kinds[0] if kinds else None
    if kind is SecretStr:
        return '"<secret>"'
    if kind is Path:
        return '"<path>"'
    if kind is bool:
        return "<true|false>"
    if kind is int:
        return "<number>"
    if kind is float:
        return "<seconds or number>"
    return '"<text>"'


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def annotate(toml_text: str, comments: dict[Section, list[str]]) -> str:
    """`toml_text` (from `dump_toml`) with each section's comments after its settings;
    sections the text lacks are added, as empty tables, at the end."""
    pending = {k: list(v) for k, v in comments.items() if v}
    out: list[str] = []
    current: Section = ()

    def flush(section: Section) -> None:
        lines = pending.pop(section, None)
        if not lines:
            return
        while out and out[-1] == "":  # keep the blank line before the next table
            out.pop()
        out.extend(lines)
        out.append("")

    for line in toml_text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            flush(current)
            current = tuple(line[1:-1].split("."))
        out.append(line)
    flush(current)
    for section, lines in pending.items():
        if out and out[-1] != "":
            out.append("")
        if section:
            out.append("[" + ".".join(section) + "]")
        out.extend(lines)
    return "\n".join(out).rstrip("\n") + "\n"


__all__ = ["annotate", "unset_comments"]
