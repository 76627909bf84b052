"""Building the wire change of a local write (PROTOCOL.md §7.2). Pure: no I/O.

A change is stored in the outbox exactly as it will be sent (the `ch` of an outbox
entry), so resending it after a crash or a timeout sends the same bytes' worth of
meaning: same `n`, same stamp, same base version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

Op = Literal["put", "del"]


def base_version(checkpoint: int, whole_version: int) -> int:
    """`b` of a new change: the highest of the scope's checkpoint and the version of the
    last whole record state applied for the record (§7.2). Both promise the device saw
    every change to the record up to that version; an own ack's version does not."""
    return max(checkpoint, whole_version)


def build_change(*, n: int, h: str, c: str, k: str, s: str, b: int, op: Op,
                 f: Mapping[str, Any] | None = None, i: Mapping[str, int | float] | None = None,
                 a: Mapping[str, Sequence[str]] | None = None,
                 r: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> dict[str, Any]:
    """A wire change dict with only the members that carry something."""
    change: dict[str, Any] = {"n": n, "h": h, "c": c, "k": k, "s": s, "b": b, "op": op}
    if f:
        change["f"] = dict(f)
    if i:
        change["i"] = dict(i)
    if a:
        change["a"] = {name: list(ms) for name, ms in a.items()}
    if r:
        change["r"] = {name: {m: list(ts) for m, ts in rm.items()} for name, rm in r.items()}
    return change


def remove_tags(live: Mapping[str, Sequence[str]], members: Sequence[str]) -> dict[str, list[str]]:
    """The tags a remove names: for each member, the add-tags the device knows as live
    (the base's tags plus its own pending adds `{dev}:{n}`, less those its pending
    removes already named). Members with no known tag are not in the set: left out."""
    out: dict[str, list[str]] = {}
    for member in members:
        tags = live.get(member)
        if tags:
            out[member] = sorted(tags)
    return out


def change_id(dev: str, n: int) -> str:
    return f"{dev}:{n}"


__all__ = ["Op", "base_version", "build_change", "change_id", "remove_tags"]
