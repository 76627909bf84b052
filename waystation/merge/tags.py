"""Set add-tags of a re-created device store (PROTOCOL.md §5 "set", §2).

An add is tagged with its change id `{dev}:{n}`. A re-created store (a wiped or
re-imaged device, a new data directory, a store that went back in time) numbers its
changes from 1 again, so its adds would carry the tags of the old store's adds: a
remove of the old add (another device's, or one that arrived first and is remembered)
would also remove, or silently swallow, the new store's add of the same member.

So the server tags the adds of such a store `{dev}:{base + n}`, `base` a multiple of
2^32 derived from the store's incarnation: still a tag of the §2 form every device
reads (n stays below 2^53), and never one of an earlier store (whose numbers stay
below 2^32). A device knows its own pending add by its plain change id only, so a
remove it sends names its own adds `{dev}:{n}`: such a tag stands for the tagged form
too. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

TAG_SPAN = 1 << 32
"""Change numbers at or above this are tagged as they are (no store writes that many)."""
_BASES = (1 << 21) - 1
"""Distinct bases: (_BASES << 32) + TAG_SPAN stays below 2^53, the largest `n` (§2)."""


def tag_base(inc: str) -> int:
    """The base of the add-tags of store incarnation `inc` (a multiple of 2^32, > 0)."""
    h = int.from_bytes(hashlib.blake2b(inc.encode(), digest_size=8).digest(), "big")
    return (1 + h % (_BASES - 1)) * TAG_SPAN


def add_tag(dev: str, n: int, base: int) -> str:
    """The tag of change `n`'s add from `dev` (base 0: the change id itself)."""
    return f"{dev}:{n + base if base and n < TAG_SPAN else n}"


def seen_tags(dev: str, seen: Iterable[str], base: int) -> list[str]:
    """The tags a remove from `dev` names, with its own plain change ids also in their
    tagged form (the device names its pending adds by change id)."""
    out = list(seen)
    if not base:
        return out
    own = f"{dev}:"
    for tag in list(out):
        if tag.startswith(own):
            number = tag[len(own):]
            if number.isdigit() and int(number) < TAG_SPAN:
                out.append(f"{own}{int(number) + base}")
    return out


def tag_change(tag: str) -> tuple[str, int]:
    """The device and the change number within its store of an add-tag."""
    dev, _, n = tag.rpartition(":")
    return dev, int(n) % TAG_SPAN


__all__ = ["TAG_SPAN", "add_tag", "seen_tags", "tag_base", "tag_change"]
