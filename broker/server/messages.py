"""Building the server's down messages as bytes: compact, bounded in size, compressible.

Record states are encoded once (`orjson`) and spliced into every message that carries
them, so fanning one change out to many devices costs one encoding. A message never
exceeds `MAX_DOWN_BYTES` of JSON (well under the 256 KiB / 1 MiB a device accepts,
PROTOCOL.md §3): a long ack, reject or delta is split into several messages of the same
type, each complete on its own (an ack keeps each change's `ok` entry with its `fx`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson

from schemas import zdict
from waystation import merge

MAX_DOWN_BYTES = 192 * 1024
"""Largest JSON text of one down message (before compression)."""
COMPRESS_LEVEL = 6

_ENVELOPE = 64  # bytes of {"type":...,"v":1,...} around the arrays


class Packing(NamedTuple):
    """How a device takes its down messages: zlib past `over` bytes (hello `z`), and
    with `zdict`, every message compressed with the preset dictionary when that is
    smaller (capability `zd1`, schemas.zdict)."""

    over: int | None
    zdict: bool = False


Compression = Packing | int | None
"""A device's compression: a `Packing`, or just the bound (None: never compress)."""


def compress(data: bytes, over: Compression) -> bytes:
    """zlib-compress `data` when it is longer than `over` bytes and shrinks (§3); with
    the preset dictionary whenever that shrinks it, for a device that agreed to it."""
    if isinstance(over, Packing):
        if over.zdict:
            return zdict.pack(data)
        over = over.over
    if over is not None and len(data) > over:
        packed = zlib.compress(data, COMPRESS_LEVEL)
        if len(packed) < len(data):
            return packed
    return data


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def whole_rec(raw: dict[str, Any]) -> bytes:
    """A stored record as the whole record state devices read (§6): what a catch-up page
    and a nudge delta carry."""
    return dumps(merge.to_rec(merge.from_json(raw)))


def _array(items: Iterable[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


def _chunks(sizes: Sequence[int], budget: int = MAX_DOWN_BYTES) -> list[range]:
    """Split items (by their byte sizes) into consecutive runs that fit `budget`."""
    runs: list[range] = []
    start = 0
    used = _ENVELOPE
    for i, size in enumerate(sizes):
        if i > start and used + size + 1 > budget:
            runs.append(range(start, i))
            start, used = i, _ENVELOPE
        used += size + 1
    if start < len(sizes) or not runs:
        runs.append(range(start, len(sizes)))
    return runs


def ack_messages(entries: Sequence[tuple[bytes, bytes | None]], rs: Sequence[int]) -> list[bytes]:
    """`ack` messages for (encoded `[n, s, q]`, encoded fx state or None) entries.

    Each re-stamped change number of `rs` goes in the message that carries its `ok`
    entry (§7.4: a device may read each part on its own, and a part can be lost), not
    all in the first one. Identical fx states in one message are sent once.
    """
    if not entries:
        return []
    sizes = [len(ok) + (len(fx) if fx is not None else 0) for ok, fx in entries]
    out: list[bytes] = []
    restamped = set(rs)
    for run in _chunks(sizes):
        oks = [entries[i][0] for i in run]
        fxs: list[bytes] = []
        seen: set[bytes] = set()
        for i in run:
            fx = entries[i][1]
            if fx is not None and fx not in seen:
                seen.add(fx)
                fxs.append(fx)
        body = b'{"type":"ack","v":1,"ok":' + _array(oks)
        if fxs:
            body += b',"fx":' + _array(fxs)
        if restamped:
            ns = [orjson.loads(entries[i][0])[0] for i in run]
            # an n twice in one batch is acked twice: name it once
            mine = [n for n in dict.fromkeys(ns) if n in restamped]
            if mine:
                body += b',"rs":' + dumps(mine)
        out.append(body + b"}")
    return out


def reject_messages(rejections: Sequence[bytes], err: dict[str, str] | None = None
                    ) -> list[bytes]:
    """`reject` messages for encoded rejections (and an optional message-level error)."""
    if not rejections and err is None:
        return []
    err_part = b',"err":' + dumps(err) if err is not None else b""
    out: list[bytes] = []
    for run in _chunks([len(r) for r in rejections]):
        out.append(b'{"type":"reject","v":1,"rj":' + _array(rejections[i] for i in run)
                   + err_part + b"}")
        err_part = b""
    return out


def rejection(n: int, code: str, reason: str, perm: bool,
              rec: dict[str, Any] | None = None) -> bytes:
    """One encoded rejection entry (§7.5)."""
    obj: dict[str, Any] = {"n": n, "code": code, "reason": reason, "perm": perm}
    if rec is not None:
        obj["rec"] = rec
    return dumps(obj)


def error_message(code: str, reason: str) -> bytes:
    """A `reject` carrying only a message-level error."""
    return reject_messages([], {"code": code, "reason": reason})[0]


def delta_messages(recs: Sequence[bytes]) -> list[bytes]:
    """`delta` messages carrying the encoded record states, in order."""
    if not recs:
        return []
    return [b'{"type":"delta","v":1,"d":' + _array(recs[i] for i in run) + b"}"
            for run in _chunks([len(r) for r in recs])]


def page_message(req: str, scope: str, from_q: int, to_q: int, reset: bool, more: bool,
                 recs: Sequence[bytes]) -> bytes:
    head = dumps({"type": "page", "v": 1, "req": req, "s": scope, "from": from_q, "to": to_q,
                  "reset": reset, "more": more})
    return head[:-1] + b',"recs":' + _array(recs) + b"}"


def checkpoint_message(req: str, cp: dict[str, int], denied: Sequence[str]) -> bytes:
    obj: dict[str, Any] = {"type": "checkpoint", "v": 1, "req": req, "cp": cp}
    if denied:
        obj["denied"] = list(denied)
    return dumps(obj)


def welcome_message(caps: Iterable[str], server: str, sv: int | None = None,
                    sv_min: int | None = None) -> bytes:
    """The answer to a `hello` with `caps` (PROTOCOL.md §7.11); `sv` / `sv_min` only
    with the `schema` capability."""
    msg: dict[str, Any] = {"type": "welcome", "v": 1, "caps": sorted(caps), "srv": server}
    if sv is not None:
        msg["sv"] = sv
    if sv_min is not None:
        msg["sv_min"] = sv_min
    return dumps(msg)


def command_message(cid: str, cmd: str, args: dict[str, Any]) -> bytes:
    obj: dict[str, Any] = {"type": "command", "v": 1, "id": cid, "cmd": cmd}
    if args:
        obj["args"] = args
    return dumps(obj)


__all__ = [
    "MAX_DOWN_BYTES",
    "ack_messages",
    "checkpoint_message",
    "command_message",
    "compress",
    "delta_messages",
    "dumps",
    "error_message",
    "page_message",
    "reject_messages",
    "rejection",
    "welcome_message",
]
