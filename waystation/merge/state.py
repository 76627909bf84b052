"""Record state of the server's merge: versions, registers, counters, sets, conflicts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from schemas.wire import Change
from waystation.hlc import Stamp

FORMAT_VERSION = 1
"""Version of the `to_json` storage format (the `fv` member)."""

ConflictKind = Literal["lww", "manual", "delete"]
Rejection: TypeAlias = tuple[str, str]


# --- state -----------------------------------------------------------------------------


@dataclass(slots=True)
class Version:
    """One written value: JSON value, stamp, writing device, change number.

    Operator writes have `by = "~server"` and `n = 0`. In conflict-log entries a delete
    is represented as a Version with `v = None` (the entry's kind says "delete").
    """

    v: Any
    h: Stamp
    by: str
    n: int


@dataclass(slots=True)
class Register:
    """An lww or manual field: its value, and a manual field's open conflict."""

    value: Version
    q: int
    cf: tuple[Version, ...] = ()
    cfq: int = 0


@dataclass(slots=True)
class Counter:
    """A counter field: the sum of every distinct applied increment."""

    total: int | float
    q: int


@dataclass(slots=True)
class SetField:
    """An observed-remove, add-wins set field."""

    tags: dict[str, dict[str, Stamp]]
    removed: dict[str, set[str]]
    q: int

    def members(self) -> list[str]:
        return sorted(self.tags)


FieldState: TypeAlias = Register | Counter | SetField


@dataclass(slots=True)
class RecordState:
    """The server's state of one record (see the module docstring)."""

    c: str
    k: str
    s: str
    q: int
    fields: dict[str, FieldState] = dataclasses.field(default_factory=dict)
    xh: Stamp | None = None
    xq: int = 0
    xby: str = ""
    xn: int = 0
    wh: Stamp | None = None

    @property
    def deleted(self) -> bool:
        """Deleted while the newest delete is at least as late as every other write."""
        xh = self.xh
        return xh is not None and (self.wh is None or xh >= self.wh)

    def value(self, name: str, default: Any = None) -> Any:
        """The visible value of a field (set: sorted members), or `default`."""
        if self.deleted:
            return default
        st = self.fields.get(name)
        if st is None:
            return default
        if type(st) is Register:
            return st.value.v
        if type(st) is Counter:
            return st.total
        assert isinstance(st, SetField)
        return sorted(st.tags) if st.tags else default

    def values(self) -> dict[str, Any]:
        """Every visible field -> value (empty when deleted); what `to_rec` puts in `f`."""
        if self.deleted:
            return {}
        out: dict[str, Any] = {}
        for name, st in self.fields.items():
            if type(st) is Register:
                out[name] = st.value.v
            elif type(st) is Counter:
                out[name] = st.total
            elif isinstance(st, SetField) and st.tags:
                out[name] = sorted(st.tags)
        return out


@dataclass(slots=True)
class ConflictEntry:
    """One conflict-log entry: a value that lost, and what it lost to.

    kind "lww": `loser` lost to (or was overwritten by) `winner` without having been
    seen by it, or lost by stamp. kind "manual": `loser` became a candidate of an open
    conflict on a manual field (`open` true); `winner` is the value kept. kind
    "delete": `loser` was hidden by a delete it did not see, or arrived stamped before
    a delete; `winner` is the delete (a Version with `v = None`); `field` is the field
    whose value was lost (for a set: the member's field, `loser.v` the member(s)).
    """

    c: str
    k: str
    s: str
    field: str
    kind: ConflictKind
    winner: Version | None
    loser: Version
    q: int
    open: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"c": self.c, "k": self.k, "s": self.s, "field": self.field,
                "kind": self.kind,
                "winner": None if self.winner is None else _version_dict(self.winner),
                "loser": _version_dict(self.loser), "q": self.q, "open": self.open}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConflictEntry:
        winner = data.get("winner")
        return cls(data["c"], data["k"], data["s"], data["field"], data["kind"],
                   None if winner is None else _version_from_dict(winner),
                   _version_from_dict(data["loser"]), data["q"], bool(data.get("open")))


@dataclass(slots=True)
class Outcome:
    """The result of merging one change (or an operator resolution).

    - `applied`: False when rejected; then `rejection` is `(code, reason)` and
      `record` is the record passed in, untouched.
    - `record`: the new state (version `q` of the change).
    - `changed`: fields whose stored state changed (what a delta must carry).
    - `conflicts`: conflict-log entries to store with the change.
    - `resolved`: manual fields whose open conflict this change closed.
    - `fixups`: fields whose authoritative state differs from what the writer wrote
      (the ack's `fx`, §7.4); `fix_deleted`: the record's deleted flag differs from
      what the op intended (a put on a record that stays deleted, a delete that a
      later write outlives).
    - `whole`: a part state cannot express the change (the record was created or
      revived, or a field vanished from a live record): send the whole record.
    - `change`: the change actually merged (a rule's replacement, if any);
      `transformed`: a rule replaced it. `stamp`: the stamp it was merged with.
    """

    applied: bool
    record: RecordState | None
    rejection: Rejection | None = None
    changed: set[str] = dataclasses.field(default_factory=set)
    conflicts: list[ConflictEntry] = dataclasses.field(default_factory=list)
    resolved: list[str] = dataclasses.field(default_factory=list)
    fixups: set[str] = dataclasses.field(default_factory=set)
    fix_deleted: bool = False
    whole: bool = False
    change: Change | None = None
    transformed: bool = False
    stamp: Stamp | None = None


def latest_stamp(record: RecordState | None) -> Stamp | None:
    """The newest stamp stored in `record` (observe it before stamping operator writes)."""
    if record is None:
        return None
    xh, wh = record.xh, record.wh
    if xh is None:
        return wh
    return xh if wh is None or xh > wh else wh


def _version_dict(v: Version) -> dict[str, Any]:
    return {"v": v.v, "h": v.h.encode(), "by": v.by, "n": v.n}


def _version_from_dict(data: dict[str, Any]) -> Version:
    return Version(data.get("v"), Stamp.parse(data["h"]), data["by"], data["n"])
