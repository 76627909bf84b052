"""Which changes of one `changes` message form a transaction (PROTOCOL.md §7.2.1).

Pure logic, no I/O. A change with a `tx` marker ``[id, count]`` belongs to transaction
`id` of its device; the marker's rule is that the `count` changes carrying that id stand
next to each other in the message. `units` cuts a message into units in message order:
a plain change is a unit of its own; the changes of one transaction are one unit. A
transaction whose marker breaks the rule (members not adjacent, a different count, two
counts for one id) is one unit with a `problem`: the server refuses all its changes
(`invalid`) rather than apply part of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

Marker = tuple[int, int] | None
"""A change's `tx` marker: (transaction id, count), or None for a plain change."""


@dataclass(slots=True)
class Unit:
    """Changes applied together: positions in the message, in message order."""

    tx: int | None
    """The transaction id, or None for a plain change."""
    at: list[int] = field(default_factory=list)
    problem: str = ""
    """Why the marker is unusable (the whole transaction is refused), or ""."""


def units(markers: Sequence[Marker], missing: int = 0) -> list[Unit]:
    """Cut a message whose i-th change carries `markers[i]` into units (see module).

    `missing` counts entries of the message that were not valid changes at all (their
    marker unknown): a transaction with fewer members than its count is refused, so a
    transaction that lost a member to a broken entry is never applied in part.
    """
    out: list[Unit] = []
    open_tx: dict[int, Unit] = {}
    counts: dict[int, int] = {}
    last: int | None = None
    for i, marker in enumerate(markers):
        if marker is None:
            out.append(Unit(None, [i]))
            last = None
            continue
        tid, count = marker
        unit = open_tx.get(tid)
        if unit is None:
            unit = open_tx[tid] = Unit(tid)
            counts[tid] = count
            out.append(unit)
        elif last != tid and not unit.problem:
            unit.problem = (f"the changes of transaction {tid} are not next to each other "
                            "in the message")
        if counts[tid] != count and not unit.problem:
            unit.problem = f"transaction {tid}: its changes give different counts"
        unit.at.append(i)
        last = tid
    for tid, unit in open_tx.items():
        if not unit.problem and len(unit.at) != counts[tid]:
            unit.problem = (f"transaction {tid} says {counts[tid]} changes, the message "
                            f"holds {len(unit.at)} valid ones"
                            + (f" ({missing} entries were invalid)" if missing else ""))
    return out


__all__ = ["Marker", "Unit", "units"]
