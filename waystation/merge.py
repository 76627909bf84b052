"""The server's merge of one change into one record (docs/PROTOCOL.md §5, §6).

Pure functions, no I/O. The store loads a `RecordState` (`from_json`), allocates the
scope sequence `q` for the change, calls `apply_change`, and in the same transaction
stores the new state (`to_json`), the conflict-log entries and the change's outcome.
`to_rec` turns a state into the wire record state of §6 for acks, deltas and pages.

State model (every field keeps the sequence `q` at which its state last changed):

- `Register` (lww and manual fields): the current `Version` (value, stamp, writer,
  change number) and, for manual fields, the open conflict's candidates `cf` (one per
  device, sorted by stamp) and the sequence `cfq` at which the conflict last changed.
- `Counter`: the total of every distinct increment.
- `SetField`: member -> {add-tag (change id) -> stamp} of the live tags, and
  member -> {tags ever removed}, so a remove that arrives before its add still wins.
- `RecordState`: collection, key, scope, version `q`, fields, the newest delete
  (`xh` stamp, `xq` sequence, `xby` device, `xn` change number) and `wh`, the newest
  stamp of any non-delete write. The record is deleted iff `xh >= wh`.

Invariant: every register value, manual candidate and set tag stored has a stamp later
than `xh` (a delete drops what it hides; a later write stamped before the delete is
dropped on arrival), except the scope field, which a delete never hides (it equals the
record's scope forever). So what is stored is what is visible, unless the record as a
whole is deleted. Counters keep their totals through deletes (an increment is never
lost).

Concurrency: a change C from device `dev` with base `b` *saw* a stored version W iff
W was written by `dev` or `b >= q(W)`. Writes of an equal value (JSON equality that
tells 1, 1.0 and true apart) never make a conflict-log entry and never open a manual
conflict: nothing is lost.

Field states are never mutated once stored in a `RecordState`: `apply_change` copies
the field dict and replaces the states it touches (copy-on-write), so the record passed
in is left exactly as it was, and a rejected change returns it unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from schemas.collection import ANY_INT, ANY_JSON, CollectionSpec, FieldSpec
from schemas.wire import MAX_SAFE_INT, Change
from waystation.hlc import SERVER_NODE, Stamp
from waystation.rules import Rule, RuleContext

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


# --- validation ------------------------------------------------------------------------

_WRONG_STRATEGY_HINT = {
    "lww": "send its new value in 'f'",
    "manual": "send its new value in 'f'",
    "counter": "send an increment in 'i'",
    "set": "send members to add in 'a' and tags to remove in 'r'",
}


def check_change(record: RecordState | None, change: Change, spec: CollectionSpec
                 ) -> Rejection | None:
    """Why `change` cannot be applied to `record`, as `(code, reason)`, or None.

    Checks, in the order of PROTOCOL.md §10.1: unknown fields, strategies and types,
    the scope, then value ranges and counter bounds (`rule_rejected`).
    """
    fields = spec.field_table
    late: Rejection | None = None
    for name, value in change.f.items():
        entry = fields.get(name)
        if entry is None:
            return _unknown(_at(change), name, spec)
        strategy, fs, limit = entry
        if strategy != "lww" and strategy != "manual":
            return _wrong(_at(change), name, strategy, "a value")
        if limit is not None:  # certainly fits? (see `CollectionSpec.field_table`)
            kind = type(value)
            if kind is str:
                if len(value) <= limit:
                    continue
            elif limit == ANY_JSON or (limit == ANY_INT and kind is int
                                         and -MAX_SAFE_INT <= value <= MAX_SAFE_INT):
                continue
        err = fs.type_error(value)
        if err is not None:
            if not _is_range_error(fs, value, err):
                return ("type_mismatch", f"{_at(change)}: field {name!r}: {err}")
            if late is None:  # out of range: reported after the type and scope checks
                late = ("rule_rejected", f"{_at(change)}: field {name!r}: {err}")
    for name, inc in change.i.items():
        entry = fields.get(name)
        if entry is None:
            return _unknown(_at(change), name, spec)
        strategy, fs, _ = entry
        if strategy != "counter":
            return _wrong(_at(change), name, strategy, "an increment")
        err = fs.increment_error(inc)
        if err is not None:
            return ("type_mismatch", f"{_at(change)}: field {name!r}: {err}")
    for name, members in change.a.items():
        entry = fields.get(name)
        if entry is None:
            return _unknown(_at(change), name, spec)
        strategy, fs, _ = entry
        if strategy != "set":
            return _wrong(_at(change), name, strategy, "set members to add")
        for member in members:
            err = fs.member_error(member)
            if err is not None:
                return ("type_mismatch", f"{_at(change)}: field {name!r}: {err}")
    for name, removes in change.r.items():
        entry = fields.get(name)
        if entry is None:
            return _unknown(_at(change), name, spec)
        strategy, fs, _ = entry
        if strategy != "set":
            return _wrong(_at(change), name, strategy, "set members to remove")
        for member in removes:
            err = fs.member_error(member)
            if err is not None:
                return ("type_mismatch", f"{_at(change)}: field {name!r}: {err}")
    scope_err = _scope_error(record, change, spec)
    if scope_err is not None:
        return scope_err
    if late is not None:
        return late
    if change.i:
        return _bounds_error(record, change, spec)
    return None


def _at(change: Change) -> str:
    """Where a rejection of `change` happened (its record), for the reason."""
    return f"{change.c}/{change.k}"


def _unknown(where: str, name: str, spec: CollectionSpec) -> Rejection:
    return ("unknown_field", f"{where}: collection {spec.name!r} has no field {name!r}")


def _wrong(where: str, name: str, strategy: str, sent: str) -> Rejection:
    return ("wrong_strategy", f"{where}: field {name!r} is a {strategy} field and cannot "
                              f"take {sent}: {_WRONG_STRATEGY_HINT[strategy]}")


def _is_range_error(fs: FieldSpec, value: Any, err: str) -> bool:
    if fs.type != "int" and fs.type != "float":
        return False
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return err == fs._range_error(value)


def _scope_error(record: RecordState | None, change: Change, spec: CollectionSpec
                 ) -> Rejection | None:
    s = change.s
    sf = spec.scope_field
    if record is not None:
        if s != record.s:
            return ("scope_mismatch", f"{_at(change)}: the record is in scope {record.s!r}, "
                                      f"not {s!r}")
        if sf is not None and sf in change.f and change.f[sf] != record.s:
            return ("scope_mismatch", f"{_at(change)}: field {sf!r} holds the record's scope "
                                      f"and cannot change (it is {record.s!r}, the change "
                                      f"sets {change.f[sf]!r})")
        return None
    if spec.scope is not None:
        if s != spec.scope:
            return ("scope_mismatch", f"{_at(change)}: every {spec.name} record is in scope "
                                      f"{spec.scope!r}, not {s!r}")
        return None
    assert sf is not None
    # Any change may arrive before the put that created its record (a device's changes
    # drain by priority; brokers lose and reorder messages): one that does not name the
    # scope field creates the record in `s`, and the creating put, when it comes, must
    # set the field to that same `s` (checked above, as for any existing record).
    if sf in change.f and change.f[sf] != s:
        return ("scope_mismatch", f"{_at(change)}: the change is in scope {s!r} but sets "
                                  f"{sf!r} to {change.f[sf]!r}")
    return None


def _bounds_error(record: RecordState | None, change: Change, spec: CollectionSpec
                  ) -> Rejection | None:
    fields = record.fields if record is not None else {}
    for name, inc in change.i.items():
        fs = spec.fields[name]
        lo, hi = fs.min, fs.max
        if lo is None and hi is None:
            continue
        st = fields.get(name)
        total = st.total if type(st) is Counter else 0
        after = total + inc
        # Only a change that moves the total out of range (or further out) is refused.
        if lo is not None and after < lo and inc < 0:
            return ("rule_rejected", f"{_at(change)}: {name} would go below {_num(lo)} "
                                     f"(is {_num(total)}, change {_num(inc)})")
        if hi is not None and after > hi and inc > 0:
            return ("rule_rejected", f"{_at(change)}: {name} would go above {_num(hi)} "
                                     f"(is {_num(total)}, change {_num(inc)})")
    return None


def _num(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- apply -----------------------------------------------------------------------------


def apply_change(record: RecordState | None, change: Change, dev: str, q: int,
                 spec: CollectionSpec, *, stamp: Stamp | None = None,
                 rules: Sequence[Rule] = ()) -> Outcome:
    """Merge `change` from device `dev` into `record` at scope sequence `q`.

    `record` is None when the store has no record under the key. `stamp` replaces the
    change's own stamp (server re-stamping, §4). `rules` run on the tentative result
    and may accept, transform or reject the change. The record passed in is never
    modified; on rejection the outcome holds it unchanged.
    """
    err = check_change(record, change, spec)
    if err is not None:
        return Outcome(False, record, err, change=change)
    if stamp is None:
        h = change.h
        stamp = Stamp(int(h[:12], 16), int(h[12:], 16), dev)
    out = _merge(record, change, dev, q, spec, stamp)
    if rules:
        out = _run_rules(record, change, dev, q, spec, stamp, rules, out)
    return out


def _run_rules(record: RecordState | None, original: Change, dev: str, q: int,
               spec: CollectionSpec, stamp: Stamp, rules: Sequence[Rule],
               out: Outcome) -> Outcome:
    change = original
    where = f"{original.c}/{original.k}"
    for rule in rules:
        assert out.record is not None
        decision = rule(RuleContext(change, dev, spec, record, out.record))
        if decision is None or decision.action == "accept":
            continue
        if decision.action == "reject":
            return Outcome(False, record, ("rule_rejected", f"{where}: {decision.reason}"),
                           change=original)
        new = decision.change
        name = getattr(rule, "__name__", repr(rule))
        if new is None or (new.n, new.c, new.k, new.s) != (
                original.n, original.c, original.k, original.s):
            return Outcome(False, record, (
                "rule_rejected", f"{where}: rule {name} transformed the change into one "
                                 "for another change number, record or scope"), change=original)
        err = check_change(record, new, spec)
        if err is not None:
            return Outcome(False, record, (err[0], f"{err[1]} (after rule {name} "
                                                   "transformed the change)"), change=original)
        change = new
        out = _merge(record, change, dev, q, spec, stamp)
    if change is not original:
        out.transformed = True
        out.fixups |= _differing_fields(original, change)
        assert out.record is not None
        out.fix_deleted = (original.op == "del") != out.record.deleted
    return out


def _merge(record: RecordState | None, ch: Change, dev: str, q: int, spec: CollectionSpec,
           hc: Stamp) -> Outcome:
    out = Outcome(True, None, change=ch, stamp=hc)
    fields: dict[str, FieldState]
    if record is None:
        fields = {}
        rec = RecordState(ch.c, ch.k, ch.s, q, fields)
        was_deleted = False
    else:
        fields = dict(record.fields)
        rec = RecordState(record.c, record.k, record.s, q, fields, record.xh, record.xq,
                          record.xby, record.xn, record.wh)
        was_deleted = record.deleted
    out.record = rec
    vanished = False
    if ch.op == "del":
        vanished = _delete(rec, fields, ch, dev, q, spec, hc, out)
    else:
        if rec.wh is None or hc > rec.wh:
            rec.wh = hc
        n, b = ch.n, ch.b
        xh = rec.xh
        sf = spec.scope_field
        specs = spec.field_table
        changed, fixups, conflicts = out.changed, out.fixups, out.conflicts
        for name, value in ch.f.items():
            if specs[name][0] == "manual":
                _manual(rec, fields, name, value, hc, dev, n, b, q, out)
                continue
            new = Version(value, hc, dev, n)
            if xh is not None and hc <= xh and name != sf:
                fixups.add(name)
                if rec.xby != dev:
                    conflicts.append(_lost_to_delete(rec, name, new, q))
                continue
            cur = fields.get(name)
            if type(cur) is not Register:
                fields[name] = Register(new, q)
                changed.add(name)
                continue
            w = cur.value
            if hc > w.h:
                if w.by != dev and b < cur.q and not _same(w.v, value):
                    conflicts.append(ConflictEntry(rec.c, rec.k, rec.s, name, "lww", new, w, q))
                fields[name] = Register(new, q)
                changed.add(name)
            elif hc < w.h:
                fixups.add(name)
                if w.by != dev and not _same(w.v, value):
                    conflicts.append(ConflictEntry(rec.c, rec.k, rec.s, name, "lww", w, new, q))
        for name, inc in ch.i.items():
            st = fields.get(name)
            total = st.total if type(st) is Counter else 0
            fields[name] = Counter(total + inc, q)
            changed.add(name)
            fixups.add(name)
        if ch.a or ch.r:
            adds, removes = ch.a, ch.r
            for name in (*adds, *(r for r in removes if r not in adds)):
                _set(rec, fields, name, adds.get(name), removes.get(name), hc, dev, n, q, out)
    deleted = rec.deleted
    out.fix_deleted = (ch.op == "del") != deleted
    out.whole = not deleted and (record is None or was_deleted or vanished)
    return out


def _lost_to_delete(rec: RecordState, name: str, loser: Version, q: int) -> ConflictEntry:
    assert rec.xh is not None
    return ConflictEntry(rec.c, rec.k, rec.s, name, "delete",
                         Version(None, rec.xh, rec.xby, rec.xn), loser, q)


def _manual(rec: RecordState, fields: dict[str, FieldState], name: str, value: Any,
            hc: Stamp, dev: str, n: int, b: int, q: int, out: Outcome) -> None:
    new = Version(value, hc, dev, n)
    xh = rec.xh
    if xh is not None and hc <= xh:
        out.fixups.add(name)
        if rec.xby != dev:
            out.conflicts.append(_lost_to_delete(rec, name, new, q))
        return
    cur = fields.get(name)
    if type(cur) is not Register:
        fields[name] = Register(new, q)
        out.changed.add(name)
        return
    w, cf = cur.value, cur.cf
    own: Version | None = None
    for cand in cf:
        if cand.by == dev:
            own = cand
            break
    if (w.by == dev and hc <= w.h) or (own is not None and hc <= own.h):
        out.fixups.add(name)  # the device's own older write, superseded by its newer one
        return
    if w.by == dev or b >= cur.q:
        # The writer saw the value: its write replaces it, and closes the conflict if it
        # also saw every candidate (b >= cfq), else drops only its own candidate.
        rest = tuple(c for c in cf if c.by != dev) if cf and b < cur.cfq else ()
        fields[name] = Register(new, q, rest, q if rest else 0)
        out.changed.add(name)
        if rest:
            out.fixups.add(name)
        elif cf:
            out.resolved.append(name)
        return
    cands = [c for c in cf if c.by != dev]
    out.fixups.add(name)
    if _same(value, w.v):
        # It agrees with the value kept: no new candidate; its own older one is withdrawn.
        if len(cands) != len(cf):
            fields[name] = Register(w, cur.q, tuple(cands), q if cands else 0)
            out.changed.add(name)
            if not cands:
                out.resolved.append(name)
        return
    cands.append(new)
    cands.sort(key=_stamp_of)
    fields[name] = Register(w, cur.q, tuple(cands), q)
    out.changed.add(name)
    out.conflicts.append(ConflictEntry(rec.c, rec.k, rec.s, name, "manual", w, new, q, True))


def _stamp_of(version: Version) -> Stamp:
    return version.h


def _set(rec: RecordState, fields: dict[str, FieldState], name: str,
         adds: list[str] | None, removes: dict[str, list[str]] | None, hc: Stamp,
         dev: str, n: int, q: int, out: Outcome) -> None:
    cur = fields.get(name)
    if type(cur) is SetField:
        tags, removed, old_q = cur.tags, cur.removed, cur.q
    else:
        tags, removed, old_q = {}, {}, q
    new_tags: dict[str, dict[str, Stamp]] | None = None
    new_removed: dict[str, set[str]] | None = None
    if removes:
        for member, seen in removes.items():
            had = removed.get(member)
            fresh = [t for t in seen if t not in had] if had is not None else seen
            if fresh:
                if new_removed is None:
                    new_removed = dict(removed)
                new_removed[member] = had.union(fresh) if had is not None else set(fresh)
            live = (tags if new_tags is None else new_tags).get(member)
            if live and any(t in live for t in seen):
                if new_tags is None:
                    new_tags = dict(tags)
                drop = set(seen)
                left = {t: s for t, s in live.items() if t not in drop}
                if left:
                    new_tags[member] = left
                else:
                    del new_tags[member]
    if adds:
        xh = rec.xh
        if xh is not None and hc <= xh:
            if rec.xby != dev:
                out.conflicts.append(
                    _lost_to_delete(rec, name, Version(sorted(set(adds)), hc, dev, n), q))
        else:
            tag = f"{dev}:{n}"
            rem = removed if new_removed is None else new_removed
            for member in adds:
                gone = rem.get(member)
                if gone is not None and tag in gone:
                    continue  # its remove arrived first
                live = (tags if new_tags is None else new_tags).get(member)
                if live is not None and tag in live:
                    continue
                if new_tags is None:
                    new_tags = dict(tags)
                grown = dict(live) if live else {}
                grown[tag] = hc
                new_tags[member] = grown
    if new_tags is not None:
        fields[name] = SetField(new_tags, removed if new_removed is None else new_removed, q)
        out.changed.add(name)
    elif new_removed is not None:
        fields[name] = SetField(tags, new_removed, old_q)
    out.fixups.add(name)


def _delete(rec: RecordState, fields: dict[str, FieldState], ch: Change, dev: str, q: int,
            spec: CollectionSpec, hd: Stamp, out: Outcome) -> bool:
    """Tombstone at `hd`; drop what it hides; True if a register vanished."""
    if rec.xh is not None and hd <= rec.xh:
        return False  # an older delete: the newer one already hides more
    rec.xh, rec.xq, rec.xby, rec.xn = hd, q, dev, ch.n
    dv = Version(None, hd, dev, ch.n)
    b = ch.b
    sf = spec.scope_field
    vanished = False
    c, k, s = rec.c, rec.k, rec.s
    conflicts = out.conflicts
    for name, st in list(fields.items()):
        if name == sf:
            continue
        if type(st) is Register:
            w, cf = st.value, st.cf
            keep = w.h > hd
            if not keep and w.by != dev and b < st.q:
                conflicts.append(ConflictEntry(c, k, s, name, "delete", dv, w, q))
            if cf:
                cands = [x for x in cf if x.h > hd]
                for x in cf:
                    if x.h <= hd and x.by != dev and b < st.cfq:
                        conflicts.append(ConflictEntry(c, k, s, name, "delete", dv, x, q))
            else:
                cands = []
            if keep and len(cands) == len(cf):
                continue
            out.changed.add(name)
            if keep:
                fields[name] = Register(w, st.q, tuple(cands), q if cands else 0)
            elif cands:  # the value is hidden but later candidates survive: promote one
                w, cands = cands[0], cands[1:]
                fields[name] = Register(w, q, tuple(cands), q if cands else 0)
            else:
                del fields[name]
                vanished = True
            if cf and not cands:
                out.resolved.append(name)
        elif type(st) is SetField:
            tags = st.tags
            if not any(stamp <= hd for tg in tags.values() for stamp in tg.values()):
                continue
            kept: dict[str, dict[str, Stamp]] = {}
            for member, tg in tags.items():
                live = {}
                for tag, stamp in tg.items():
                    if stamp > hd:
                        live[tag] = stamp
                        continue
                    tdev, _, tn = tag.rpartition(":")
                    if tdev != dev and b < st.q:
                        conflicts.append(ConflictEntry(c, k, s, name, "delete", dv,
                                                       Version(member, stamp, tdev, int(tn)), q))
                if live:
                    kept[member] = live
            fields[name] = SetField(kept, st.removed, q)
            out.changed.add(name)
    return vanished


def _differing_fields(a: Change, b: Change) -> set[str]:
    out: set[str] = set()
    for da, db in ((a.f, b.f), (a.i, b.i), (a.a, b.a), (a.r, b.r)):
        for name in da.keys() | db.keys():
            if name not in da or name not in db or not _same(da[name], db[name]):
                out.add(name)
    return out


def _same(x: Any, y: Any) -> bool:
    """JSON equality that tells 1, 1.0 and true apart."""
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(_same(i, j) for i, j in zip(x, y, strict=True))
    return bool(x == y)


# --- operator resolution ---------------------------------------------------------------


def resolve(record: RecordState, field: str, value: Any, q: int, stamp: Stamp, *,
            spec: CollectionSpec | None = None) -> Outcome:
    """The operator settles the open conflict of manual field `field` with `value`.

    `stamp` must be the server clock's stamp for this write, later than every stamp in
    the record (`clock.observe(latest_stamp(record))` gives one); `q` is the sequence the
    store allocated. The write is by `~server` (n = 0). With `spec`, the field and the
    value are validated like a device's write.
    """
    where = f"{record.c}/{record.k}"
    if spec is not None:
        fs = spec.fields.get(field)
        if fs is None:
            return Outcome(False, record, _unknown(where, field, spec))
        if fs.strategy != "manual":
            return Outcome(False, record, (
                "wrong_strategy", f"{where}: field {field!r} is a {fs.strategy} field; "
                                  "only manual fields have conflicts to resolve"))
        err = fs.type_error(value)
        if err is not None:
            code = "rule_rejected" if _is_range_error(fs, value, err) else "type_mismatch"
            return Outcome(False, record, (code, f"{where}: field {field!r}: {err}"))
    st = record.fields.get(field)
    if type(st) is not Register or not st.cf or record.deleted:
        return Outcome(False, record, (
            "invalid", f"{where}: field {field!r} has no open conflict to resolve"))
    newest = latest_stamp(record)
    if newest is not None and stamp <= newest:
        raise ValueError(f"resolution stamp {stamp.encode()} is not later than the record's "
                         f"newest stamp {newest.encode()}: observe it with the server clock "
                         "first")
    fields = dict(record.fields)
    fields[field] = Register(Version(value, stamp, SERVER_NODE, 0), q)
    rec = RecordState(record.c, record.k, record.s, q, fields, record.xh, record.xq,
                      record.xby, record.xn, stamp)
    return Outcome(True, rec, changed={field}, resolved=[field], stamp=stamp)


# --- record states (PROTOCOL.md §6) ----------------------------------------------------


def to_rec(record: RecordState, fields: Iterable[str] | None = None, part: bool = False
           ) -> dict[str, Any]:
    """The wire record state (§6) of `record`: all fields, or only `fields` (with `part`).

    With `part` true, a listed set field with no members is sent as `[]`; a listed field
    that no longer exists is left out (send the whole record when fields vanish, see
    `Outcome.whole`). Empty and default members are omitted.
    """
    out: dict[str, Any] = {"c": record.c, "k": record.k, "s": record.s, "q": record.q}
    if part:
        out["part"] = True
    if record.deleted:
        assert record.xh is not None
        out["x"] = True
        out["xh"] = _enc(record.xh)
        return out
    stored = record.fields
    f: dict[str, Any] = {}
    h: dict[str, str] = {}
    t: dict[str, dict[str, list[str]]] = {}
    cf: dict[str, list[dict[str, Any]]] = {}
    for name in (stored if fields is None else fields):
        st = stored.get(name)
        if st is None:
            continue
        if type(st) is Register:
            f[name] = st.value.v
            h[name] = _enc(st.value.h)
            if st.cf:
                cf[name] = [{"v": x.v, "by": x.by, "h": _enc(x.h)} for x in st.cf]
        elif type(st) is Counter:
            f[name] = st.total
        elif isinstance(st, SetField):
            if st.tags:
                members = sorted(st.tags)
                f[name] = members
                t[name] = {m: sorted(st.tags[m]) for m in members}
            elif part:
                f[name] = []
    if f:
        out["f"] = f
    if h:
        out["h"] = h
    if t:
        out["t"] = t
    if cf:
        out["cf"] = cf
    return out


def fx_rec(outcome: Outcome) -> dict[str, Any] | None:
    """The ack's `fx` state for an applied change (§7.4), or None when none is needed."""
    rec = outcome.record
    if not outcome.applied or rec is None:
        return None
    if outcome.whole or (outcome.fix_deleted and not rec.deleted):
        return to_rec(rec)
    if outcome.fixups or outcome.fix_deleted:
        return to_rec(rec, sorted(outcome.fixups), part=True)
    return None


def delta_rec(outcome: Outcome) -> dict[str, Any] | None:
    """The state to send other devices for an applied change (§7.6)."""
    rec = outcome.record
    if not outcome.applied or rec is None:
        return None
    if outcome.whole:
        return to_rec(rec)
    return to_rec(rec, sorted(outcome.changed), part=True)


# --- storage format --------------------------------------------------------------------


def to_json(record: RecordState) -> dict[str, Any]:
    """A compact orjson-friendly form of `record` for storage; `from_json` inverts it.

    `{"fv": 1, "c", "k", "s", "q", "f": {field: state}, "x": [xh, xq, xby, xn], "wh"}`
    with field states `["r", q, version, cfq, [versions]]` (register; the last two only
    with an open conflict), `["c", q, total]` (counter), `["s", q, {member: {tag: stamp}},
    {member: [removed tags]}]` (set; a tag's stamp is just its time part when its node is
    the tag's device), and versions `[v, stamp, n]` (or `[v, stamp, n, by]`
    when the writer is not the stamp's node). Stamps are in their full string form.
    """
    f: dict[str, Any] = {}
    encoded = _ENCODED
    for name, st in record.fields.items():
        if type(st) is Register:
            v = st.value  # _vj(st.value), inlined: most fields are registers
            h = v.h
            text = encoded.get(h) or _enc(h)
            vj = [v.v, text, v.n] if v.by == h.node else [v.v, text, v.n, v.by]
            if st.cf:
                f[name] = ["r", st.q, vj, st.cfq, [_vj(x) for x in st.cf]]
            else:
                f[name] = ["r", st.q, vj]
        elif type(st) is Counter:
            f[name] = ["c", st.q, st.total]
        elif isinstance(st, SetField):
            f[name] = ["s", st.q,
                       {m: {t: _tag_stamp_json(t, s) for t, s in tg.items()}
                        for m, tg in st.tags.items()},
                       {m: sorted(ts) for m, ts in st.removed.items()}]
    out: dict[str, Any] = {"fv": FORMAT_VERSION, "c": record.c, "k": record.k, "s": record.s,
                           "q": record.q, "f": f}
    if record.xh is not None:
        out["x"] = [_enc(record.xh), record.xq, record.xby, record.xn]
    if record.wh is not None:
        out["wh"] = _enc(record.wh)
    return out


def from_json(data: dict[str, Any]) -> RecordState:
    """Inverse of `to_json`; ValueError on an unknown format version or a broken state."""
    fv = data.get("fv") if isinstance(data, dict) else None
    if fv != FORMAT_VERSION:
        raise ValueError(f"stored record has format version {fv!r}; this server reads "
                         f"version {FORMAT_VERSION}")
    try:
        fields: dict[str, FieldState] = {}
        parsed = _PARSED
        for name, st in data["f"].items():
            tag = st[0]
            if tag == "r":
                v = st[2]  # _jv(st[2]), inlined: most fields are registers
                h = parsed.get(v[1]) or _stamp(v[1])
                value = Version(v[0], h, v[3] if len(v) > 3 else h.node, v[2])
                if len(st) > 3:
                    fields[name] = Register(value, st[1], tuple(_jv(x) for x in st[4]), st[3])
                else:
                    fields[name] = Register(value, st[1])
            elif tag == "c":
                fields[name] = Counter(st[2], st[1])
            elif tag == "s":
                fields[name] = SetField(
                    {m: {t: _tag_stamp(t, s) for t, s in tg.items()} for m, tg in st[2].items()},
                    {m: set(ts) for m, ts in st[3].items()}, st[1])
            else:
                raise ValueError(f"unknown field state {tag!r}")
        rec = RecordState(data["c"], data["k"], data["s"], data["q"], fields)
        x = data.get("x")
        if x is not None:
            rec.xh, rec.xq, rec.xby, rec.xn = _stamp(x[0]), x[1], x[2], x[3]
        wh = data.get("wh")
        if wh is not None:
            rec.wh = _stamp(wh)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"stored record is damaged: {type(exc).__name__}: {exc}") from None
    return rec


# Stamps in both directions, remembered: the fields of a record written by one change
# share its stamp, and a record read, merged and written back re-encodes the stamps it
# was read with. Bounded (cleared when full); entries are immutable, so sharing is safe.
_STAMP_CACHE_MAX = 8192
_PARSED: dict[str, Stamp] = {}
_ENCODED: dict[Stamp, str] = {}


def _stamp(text: str) -> Stamp:
    # Stored stamps were written by to_json: skip the regex validation of Stamp.parse.
    stamp = _PARSED.get(text)
    if stamp is None:
        stamp = Stamp(int(text[:12], 16), int(text[12:16], 16), text[17:])
        if len(_PARSED) >= _STAMP_CACHE_MAX:
            _PARSED.clear()
        _PARSED[text] = stamp
        if len(_ENCODED) >= _STAMP_CACHE_MAX:
            _ENCODED.clear()
        _ENCODED[stamp] = text
    return stamp


def _enc(stamp: Stamp) -> str:
    """`stamp.encode()`, remembered (see `_stamp`)."""
    text = _ENCODED.get(stamp)
    if text is None:
        text = stamp.encode()
        if len(_ENCODED) >= _STAMP_CACHE_MAX:
            _ENCODED.clear()
        _ENCODED[stamp] = text
    return text


def _tag_stamp_json(tag: str, stamp: Stamp) -> str:
    # An add-tag's stamp is nearly always its writer's: store only the time part then.
    if stamp.node == tag.rpartition(":")[0]:
        return stamp.time_part()
    return stamp.encode()


def _tag_stamp(tag: str, text: str) -> Stamp:
    if len(text) == 16:
        return Stamp(int(text[:12], 16), int(text[12:], 16), tag.rpartition(":")[0])
    return _stamp(text)


def _vj(v: Version) -> list[Any]:
    h = v.h
    if v.by == h.node:
        return [v.v, _enc(h), v.n]
    return [v.v, _enc(h), v.n, v.by]


def _jv(data: list[Any]) -> Version:
    h = _stamp(data[1])
    return Version(data[0], h, data[3] if len(data) > 3 else h.node, data[2])


def _version_dict(v: Version) -> dict[str, Any]:
    return {"v": v.v, "h": v.h.encode(), "by": v.by, "n": v.n}


def _version_from_dict(data: dict[str, Any]) -> Version:
    return Version(data.get("v"), Stamp.parse(data["h"]), data["by"], data["n"])


__all__ = [
    "FORMAT_VERSION",
    "ConflictEntry",
    "ConflictKind",
    "Counter",
    "FieldState",
    "Outcome",
    "RecordState",
    "Register",
    "Rejection",
    "SetField",
    "Version",
    "apply_change",
    "check_change",
    "delta_rec",
    "from_json",
    "fx_rec",
    "latest_stamp",
    "resolve",
    "to_json",
    "to_rec",
]
