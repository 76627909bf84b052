"""Device-row fields the engine holds in memory until a store transaction writes them
(`broker.server.engine_txn`), one map for all of them.

Two kinds of field wait here, told apart by name:

- contact times (`CONTACT_FIELDS`: `last_seen_ms`, `synced_ms`) are for the operator's
  view only. Written at every message they would rewrite the device's row per message:
  they wait for the once-a-second tick (`take_all`), or go with the row when a group
  writes it anyway (`contact_of`, then `written`). At most a tick's worth is lost in a
  crash; a clean stop writes them (`Engine.flush`).
- anything else (presence: `online`, `pend`) makes its row due: the next transaction
  writes it, a group's (`take_due`) or the tick's.

Later values win over earlier ones, also over values a failed transaction hands back
(`restore`). Pure bookkeeping, no I/O; one thread (the engine's).
"""

from __future__ import annotations

from typing import Any

CONTACT_FIELDS = frozenset({"last_seen_ms", "synced_ms"})
"""Row fields that wait for the tick when nothing else of their row is written."""

Fields = dict[str, dict[str, Any]]
"""Device id -> row fields to write."""


class PendingRows:
    """Row fields waiting to be written (see module docstring)."""

    __slots__ = ("_due", "_fields")

    def __init__(self) -> None:
        self._fields: Fields = {}
        self._due: set[str] = set()
        """Devices with more than contact times waiting: found without a scan of every
        device's contact times at each group."""

    def __bool__(self) -> bool:
        return bool(self._fields)

    def put(self, dev: str, fields: dict[str, Any]) -> None:
        """Fields of `dev`'s row to write (newer than any waiting)."""
        self._fields.setdefault(dev, {}).update(fields)
        if not fields.keys() <= CONTACT_FIELDS:
            self._due.add(dev)

    def take_due(self) -> Fields:
        """Take the rows the next transaction must write (with their contact times)."""
        due, self._due = self._due, set()
        return {dev: self._fields.pop(dev) for dev in due}

    def take_all(self) -> Fields:
        """Take everything waiting (the tick, a clean stop)."""
        fields, self._fields, self._due = self._fields, {}, set()
        return fields

    def contact_of(self, dev: str) -> dict[str, Any]:
        """What waits for `dev` that was not taken, to go with its row when a group
        writes it anyway: its contact times (and fields due that a failed group handed
        back: written along, they stay due all the same). Call `written` once that
        commits."""
        return self._fields.get(dev, {})

    def written(self, dev: str) -> None:
        """`dev`'s row was written with what waited for it (`contact_of`). Fields put
        for it since (due ones) stay for the next transaction."""
        if dev not in self._due:
            self._fields.pop(dev, None)

    def restore(self, taken: Fields) -> None:
        """Put back what a failed transaction took, under what arrived meanwhile."""
        for dev, fields in taken.items():
            newer = self._fields.get(dev, {})
            self.put(dev, {**fields, **newer})


__all__ = ["CONTACT_FIELDS", "Fields", "PendingRows"]
