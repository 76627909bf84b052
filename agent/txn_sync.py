"""How a transaction's changes travel (PROTOCOL.md §7.2.1, §9.3): kept together in one
batch, marked with `tx` when the server negotiated `txn`, rolled back as one.

The outbox entries of one transaction (`agent.transaction.mark`) carry
``"x": [first n, count]``: consecutive change numbers, one priority, one incarnation.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

import orjson

from agent.changes import change_id
from agent.core import Work
from schemas import codec, wire

Entry = dict[str, Any]


def members(work: Work, n: int, entry: Entry,
            excluded: AbstractSet[int]) -> list[tuple[int, Entry]]:
    """The changes of `entry`'s transaction still in the outbox, in n order (`n` is the
    first of them the drain met; its entry is `entry`); empty when any of them is in
    flight or waiting for a retry: a transaction goes out whole or not at all."""
    first, count = int(entry["x"][0]), int(entry["x"][1])
    out: list[tuple[int, Entry]] = []
    for m in range(first, first + count):
        if m in excluded:
            return []
        found = entry if m == n else work.outbox_entry(m)
        if found is not None:
            out.append((m, found))
    return out


def end(entry: Entry) -> int:
    """The change number after the last of `entry`'s transaction."""
    return int(entry["x"][0]) + int(entry["x"][1])


def wire_changes(group: list[tuple[int, Entry]], txn: bool) -> list[tuple[int, dict[str, Any]]]:
    """The batch items of a transaction: with `txn`, each change with its `tx` marker
    (id: the transaction's first change number; count: its changes in this message)."""
    if not txn or not group:
        return [(m, e["ch"]) for m, e in group]
    marker = [int(group[0][1]["x"][0]), len(group)]
    return [(m, {**e["ch"], "tx": marker}) for m, e in group]


def cost(group: list[tuple[int, Entry]], txn: bool) -> int:
    """Bytes the group adds to a `changes` message."""
    marker = len(',"tx":[9007199254740991,1000]') if txn else 0
    return sum(len(orjson.dumps(e["ch"])) + 1 + marker for _, e in group)


def with_transactions(work: Work, rejections: list[wire.Rejection],
                       dev: str) -> list[wire.Rejection]:
    """The rejections, plus `txn_aborted` for every change still in the outbox that
    belongs to a transaction of which a change was refused for good (PROTOCOL.md §9.3):
    a transaction rolls back as one even when the server named only some of its
    changes (a server without `txn` answers changes one by one)."""
    named = {rj.n for rj in rejections}
    extra: list[wire.Rejection] = []
    for rj in rejections:
        entry = work.outbox_entry(rj.n) if rj.perm else None
        marker = entry.get("x") if entry is not None else None
        if not marker:
            continue
        first, count = int(marker[0]), int(marker[1])
        for m in range(first, first + count):
            if m in named or work.outbox_entry(m) is None:
                continue
            named.add(m)
            reason = (f"transaction {change_id(dev, first)} was rejected as a whole: change "
                      f"{change_id(dev, rj.n)} was refused ({rj.code}: {rj.reason})")
            extra.append(wire.Rejection(n=m, code=codec.TXN_ABORTED, reason=reason[:2000],
                                        perm=True))
    return [*rejections, *extra] if extra else rejections


__all__ = ["cost", "end", "members", "wire_changes", "with_transactions"]
