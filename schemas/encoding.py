"""Typed messages and plain dicts to wire bytes (PROTOCOL.md §3, §7).

``encode(msg, *, compress_over=None) -> bytes`` writes the message's members by
their wire names, leaving out optional members equal to their defaults but always
writing `type` and `v` (first) and the members the tables of §7 mark as required
even when the model has a default for them (`page.reset/more/recs`, `reject.rj`,
a change's `b`). ``encode_dict(obj, *, compress_over=None) -> bytes`` is
the same for a plain dict built on a hot path; it does not validate (the caller
promises a valid message with `type`, `v` and every required member; its key order
is kept). With
`compress_over` set, a payload longer than that many bytes is zlib-compressed
(level 6) when that makes it smaller. With `zdict=True` (only towards a peer that
agreed to capability `zd1`, `schemas.zdict`) every payload, small ones included, is
compressed with the preset dictionary when that makes it smaller; `zdict` given as
bytes is the dictionary to use instead (a schema's, capability `zd2`,
`schemas.zdict_schema`, towards a server that agreed to it). Both raise
`ProtocolError` (`invalid`) for values JSON cannot carry (and `encode_dict` for
integers beyond 53 bits). A model validated by `schemas.wire` always encodes to bytes
`decode` accepts back equal; one built with `model_construct` is not re-checked.
"""

from __future__ import annotations

import zlib
from typing import Any, Final

import orjson

from schemas import zdict as _zdict
from schemas.codes import INVALID
from schemas.errors import ProtocolError
from schemas.reasons import clip_reason
from schemas.wire import Change, Changes, Message, Page, Reject

COMPRESS_LEVEL: Final = 6


def encode(msg: Message, *, compress_over: int | None = None, zdict: bool | bytes = False) -> bytes:
    """The wire bytes of `msg`: `type` and `v` first, optional members at their defaults
    left out (members PROTOCOL.md §7 requires are always written)."""
    model = type(msg)
    try:
        if isinstance(msg, Changes):
            body = _changes_json(msg)
        else:
            body = msg.__pydantic_serializer__.to_json(msg, by_alias=True, exclude_defaults=True)
    except Exception as exc:
        raise ProtocolError(
            INVALID, clip_reason(f"cannot encode {model.__name__}: {type(exc).__name__}")
        ) from None
    required = _REQUIRED_WITH_DEFAULT.get(model)
    if required:
        body = _append(body, [text for name, text in required if _at_default(msg, name)])
    # `type` and `v` are single-valued literals, always at their defaults, so `body`
    # never holds them: they are spliced in front.
    head = _HEADS.get(model) or _head(model)
    data = head + b"}" if body == b"{}" else head + b"," + body[1:]
    return compress(data, compress_over, zdict)


# Members that PROTOCOL.md §7 lists as required (no "?") but that the models give a
# default: `exclude_defaults` would drop them, so they are written back when at their
# default, for readers in other languages that rely on the tables.
_REQUIRED_WITH_DEFAULT: Final[dict[type[Message], tuple[tuple[str, bytes], ...]]] = {
    Page: (("reset", b'"reset":false'), ("more", b'"more":false'), ("recs", b'"recs":[]')),
    Reject: (("rj", b'"rj":[]'),),
}
_CHANGE_SERIALIZER = Change.__pydantic_serializer__


def _at_default(msg: Message, name: str) -> bool:
    default = type(msg).model_fields[name].get_default(call_default_factory=True)
    return bool(getattr(msg, name) == default)


def _append(body: bytes, members: list[bytes]) -> bytes:
    """`body` (a JSON object) with the raw `members` added at its end."""
    if not members:
        return body
    joined = b",".join(members)
    return body[:-1] + joined + b"}" if body == b"{}" else body[:-1] + b"," + joined + b"}"


def _changes_json(msg: Changes) -> bytes:
    """A batch, with each change's base version `b` written even when it is 0 (§7.2)."""
    envelope = msg.__pydantic_serializer__.to_json(
        msg, by_alias=True, exclude_defaults=True, exclude={"ch"}
    )
    parts = []
    for change in msg.ch:
        text = _CHANGE_SERIALIZER.to_json(change, by_alias=True, exclude_defaults=True)
        parts.append(_append(text, [b'"b":0']) if change.b == 0 else text)
    return _append(envelope, [b'"ch":[' + b",".join(parts) + b"]"])


_HEADS: dict[type[Message], bytes] = {}


def _head(model: type[Message]) -> bytes:
    fields = model.model_fields
    if "type" not in fields:
        raise ProtocolError(INVALID, f"cannot encode {model.__name__}: it has no 'type'")
    head = orjson.dumps({"type": fields["type"].default, "v": fields["v"].default})[:-1]
    _HEADS[model] = head
    return head


def encode_dict(obj: dict[str, Any], *, compress_over: int | None = None,
                zdict: bool | bytes = False) -> bytes:
    """The wire bytes of a message built as a dict (not validated: the caller's duty).

    Integers outside the 53-bit range are refused; orjson writes NaN and infinities as
    null, so callers must not put them in.
    """
    try:
        data = orjson.dumps(obj, option=orjson.OPT_STRICT_INTEGER)
    except Exception as exc:
        raise ProtocolError(INVALID, clip_reason(f"cannot encode the message: {exc}")) from None
    return compress(data, compress_over, zdict)


def compress(data: bytes, compress_over: int | None, zdict: bool | bytes = False) -> bytes:
    """`data` (a message's JSON text) as sent: with a preset dictionary (`zdict`: True
    for zd1's, bytes for another), else plain zlib above `compress_over` bytes, and
    only when that is smaller."""
    if zdict is True:
        return _zdict.pack(data)
    if zdict:
        return _zdict.pack(data, zdict)
    if compress_over is not None and len(data) > compress_over:
        packed = zlib.compress(data, COMPRESS_LEVEL)
        if len(packed) < len(data):
            return packed
    return data


__all__ = ["COMPRESS_LEVEL", "compress", "encode", "encode_dict"]
