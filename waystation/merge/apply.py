"""Merging one change into one record (PROTOCOL.md §5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.collection import CollectionSpec
from schemas.wire import Change
from waystation.hlc import Stamp
from waystation.merge.checks import check_change
from waystation.merge.state import (
    ConflictEntry,
    Counter,
    FieldState,
    Outcome,
    RecordState,
    Register,
    SetField,
    Version,
)
from waystation.merge.tags import add_tag, seen_tags, tag_change
from waystation.rules import Rule, RuleContext

# --- apply -----------------------------------------------------------------------------


def apply_change(record: RecordState | None, change: Change, dev: str, q: int,
                 spec: CollectionSpec, *, stamp: Stamp | None = None,
                 rules: Sequence[Rule] = (), tag_base: int = 0) -> Outcome:
    """Merge `change` from device `dev` into `record` at scope sequence `q`.

    `record` is None when the store has no record under the key. `stamp` replaces the
    change's own stamp (server re-stamping, §4). `rules` run on the tentative result
    and may accept, transform or reject the change. `tag_base`: the change comes from a
    re-created store, whose set adds are tagged apart (`waystation.merge.tags`). The
    record passed in is never modified; on rejection the outcome holds it unchanged.
    """
    err = check_change(record, change, spec)
    if err is not None:
        return Outcome(False, record, err, change=change)
    if stamp is None:
        h = change.h
        stamp = Stamp(int(h[:12], 16), int(h[12:], 16), dev)
    out = _merge(record, change, dev, q, spec, stamp, tag_base)
    if rules:
        out = _run_rules(record, change, dev, q, spec, stamp, rules, out, tag_base)
    return out


def _run_rules(record: RecordState | None, original: Change, dev: str, q: int,
               spec: CollectionSpec, stamp: Stamp, rules: Sequence[Rule],
               out: Outcome, tag_base: int = 0) -> Outcome:
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
        out = _merge(record, change, dev, q, spec, stamp, tag_base)
    if change is not original:
        out.transformed = True
        out.fixups |= _differing_fields(original, change)
        assert out.record is not None
        out.fix_deleted = (original.op == "del") != out.record.deleted
    return out


def _merge(record: RecordState | None, ch: Change, dev: str, q: int, spec: CollectionSpec,
           hc: Stamp, tag_base: int = 0) -> Outcome:
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
                _set(rec, fields, name, adds.get(name), removes.get(name), hc, dev, n, q, out,
                     tag_base)
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
         dev: str, n: int, q: int, out: Outcome, tag_base: int) -> None:
    cur = fields.get(name)
    if type(cur) is SetField:
        tags, removed, old_q = cur.tags, cur.removed, cur.q
    else:
        tags, removed, old_q = {}, {}, q
    new_tags: dict[str, dict[str, Stamp]] | None = None
    new_removed: dict[str, set[str]] | None = None
    if removes:
        for member, named in removes.items():
            seen = seen_tags(dev, named, tag_base)
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
            tag = add_tag(dev, n, tag_base)
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
                    tdev, tn = tag_change(tag)
                    if tdev != dev and b < st.q:
                        conflicts.append(ConflictEntry(c, k, s, name, "delete", dv,
                                                       Version(member, stamp, tdev, tn), q))
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
