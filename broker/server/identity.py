"""Who a change is: its outcome key (device, incarnation, n) and a digest of its content.

Pure: no I/O. PROTOCOL.md §2 and §10.2: a change id names one change for all time, but
only within one incarnation of a device's store (a re-created store numbers its changes
from 1 again), so the server keeps each change's outcome under the device *and* the
incarnation it was written in. Outcomes also keep a digest of the change's content: a
change id sent again with other content (a store restored from a backup, or copied,
re-using ids it had already used) is refused with `id_reused`, never acknowledged as a
duplicate of what it is not.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson

from broker.server.store.rows import DeviceRow
from schemas.wire import Change
from waystation.merge.tags import tag_base

NS_SEP = "/"
"""Separates device and incarnation in an outcome namespace; never in a device id."""


def outcome_ns(dev: str, inc: str | None) -> str:
    """The namespace the outcomes of `dev`'s changes of incarnation `inc` live in.

    The legacy incarnation (devices from before incarnations: no `inc`) is the device
    id itself, so outcomes stored before incarnations existed keep answering resends.
    """
    return dev if not inc else f"{dev}{NS_SEP}{inc}"


def ns_device(ns: str) -> str:
    """The device id of an outcome namespace."""
    return ns.partition(NS_SEP)[0]


def change_digest(ch: Change) -> str:
    """A digest of what a change says (16 hex digits).

    Covers every member a device must resend unchanged (§10.2): n, h, c, k, s, b, op and
    the values in f / i / a / r, in a canonical form (members left out when empty, tag
    lists sorted), so the same change resent digests the same whatever its JSON layout.
    """
    doc: dict[str, Any] = {"n": ch.n, "h": ch.h, "c": ch.c, "k": ch.k, "s": ch.s, "b": ch.b,
                           "op": ch.op}
    if ch.f:
        doc["f"] = ch.f
    if ch.i:
        doc["i"] = ch.i
    if ch.a:
        doc["a"] = {name: sorted(ms) for name, ms in ch.a.items()}
    if ch.r:
        doc["r"] = {name: {m: sorted(tags) for m, tags in rm.items()}
                    for name, rm in ch.r.items()}
    raw = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def store_tag_base(device: DeviceRow, inc: str | None) -> int:
    """The base of the set add-tags of `device`'s changes written in incarnation `inc`
    (`waystation.merge.tags`): 0 (its change ids) for the legacy incarnation and the
    device's first store, the only one its `hello`s announced; apart for any other (a
    store re-created since, whose numbers start at 1 again, or one that never said
    `hello`: the server cannot tell it is the first)."""
    if not inc or (device.incs == 1 and inc == device.inc):
        return 0
    return tag_base(inc)


_CONTENT = ("n", "h", "c", "k", "s", "b", "op", "f", "i", "a", "r")


def entry_digest(entry: Any) -> str:
    """A digest of a `changes` entry that is not a valid change (17 characters).

    Over the members `change_digest` covers, as sent (an invalid entry has no canonical
    form); it starts with ``x``, so it never equals the digest of a valid change: an
    invalid entry and a valid change are never the same content (§10.2), and either one
    after the other under one change id is `id_reused`, never a duplicate.
    """
    doc = ({m: entry[m] for m in _CONTENT if m in entry} if isinstance(entry, dict)
           else entry)
    raw = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                     default=repr).encode("utf-8", "surrogatepass")
    return "x" + hashlib.blake2b(raw, digest_size=8).hexdigest()


__all__ = ["NS_SEP", "change_digest", "entry_digest", "ns_device", "outcome_ns",
           "store_tag_base"]
