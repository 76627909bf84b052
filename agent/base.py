"""The device's authoritative base record and how server record states update it.

Pure: no I/O. PROTOCOL.md §6 (applying record states) and §7.4 (applying an ack).

A `BaseRecord` keeps, per field, the version `q` at which its value was last set
(`fq`), together with its stamp (`h`, lww/manual), its add-tags (`t`, sets) and its open
conflict (`cf`, manual). The deleted flag keeps the version at which it was last set
(`xq`). Two more versions make the rules order-independent:

- `rq`, the *removal floor*: a field that is not stored is known not to exist as of
  `rq` (the highest whole state, or own delete, applied). A state listing the field
  applies only if its `q` is above the floor, so an old partial state arriving after a
  newer whole state cannot resurrect a removed field.
- `wq`, the version of the last *whole* record state applied: with the scope's
  checkpoint it gives a change's base version `b` (§7.2). Own acked changes never raise
  it (the device may have missed an earlier change of another device).

With these, the result of applying any set of record states is a function of the set
alone: for every field the state with the highest `q` decides, so duplicates and any
arrival order give the same base (tested with hypothesis).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from schemas import wire

Tags = dict[str, list[str]]
Candidates = list[dict[str, Any]]


@dataclass(slots=True)
class BaseRecord:
    """One record as the server last told this device (plus its own acked writes)."""

    c: str
    k: str
    s: str
    q: int = 0
    wq: int = 0
    rq: int = 0
    x: bool = False
    xq: int = 0
    xh: str | None = None
    f: dict[str, Any] = field(default_factory=dict)
    fq: dict[str, int] = field(default_factory=dict)
    h: dict[str, str] = field(default_factory=dict)
    t: dict[str, Tags] = field(default_factory=dict)
    cf: dict[str, Candidates] = field(default_factory=dict)
    g: int = field(default=0, compare=False)
    """Snapshot generation that last touched this record (storage bookkeeping, §9.5)."""

    def copy(self) -> BaseRecord:
        """A copy whose field maps can be changed without touching this one."""
        return BaseRecord(self.c, self.k, self.s, self.q, self.wq, self.rq, self.x, self.xq,
                          self.xh, dict(self.f), dict(self.fq), dict(self.h), dict(self.t),
                          dict(self.cf), self.g)

    def to_docs(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(the record without stamps, the per-field stamps): the two stored values."""
        doc = {"s": self.s, "q": self.q, "wq": self.wq, "rq": self.rq, "x": self.x,
               "xq": self.xq, "xh": self.xh, "f": self.f, "fq": self.fq, "t": self.t,
               "cf": self.cf, "g": self.g}
        return doc, self.h

    @classmethod
    def from_docs(cls, c: str, k: str, doc: Mapping[str, Any],
                  stamps: Mapping[str, str] | None) -> BaseRecord:
        return cls(c, k, doc["s"], doc["q"], doc["wq"], doc["rq"], doc["x"], doc["xq"],
                   doc["xh"], dict(doc["f"]), dict(doc["fq"]), dict(stamps or {}),
                   dict(doc["t"]), dict(doc["cf"]), doc.get("g", 0))


class RecState(NamedTuple):
    """A record state (PROTOCOL.md §6) as plain values."""

    c: str
    k: str
    s: str
    q: int
    part: bool
    x: bool
    xh: str | None
    f: Mapping[str, Any]
    h: Mapping[str, str]
    t: Mapping[str, Mapping[str, Sequence[str]]]
    cf: Mapping[str, Sequence[Mapping[str, Any]]]


def rec_state(rec: wire.Rec | Mapping[str, Any]) -> RecState:
    """Normalise a `wire.Rec` or a wire-shaped dict (trusted: already validated)."""
    if isinstance(rec, wire.Rec):
        cf = {name: [c.model_dump() for c in cands] for name, cands in rec.cf.items()}
        return RecState(rec.c, rec.k, rec.s, rec.q, rec.part, rec.x, rec.xh, rec.f, rec.h,
                        rec.t, cf)
    return RecState(rec["c"], rec["k"], rec["s"], int(rec["q"]), bool(rec.get("part", False)),
                    bool(rec.get("x", False)), rec.get("xh"), rec.get("f") or {},
                    rec.get("h") or {}, rec.get("t") or {}, rec.get("cf") or {})


def _drop_field(out: BaseRecord, name: str) -> None:
    out.f.pop(name, None)
    out.fq.pop(name, None)
    out.h.pop(name, None)
    out.t.pop(name, None)
    out.cf.pop(name, None)


def apply_rec(base: BaseRecord | None, rec: wire.Rec | Mapping[str, Any] | RecState) -> BaseRecord:
    """The base after applying one record state (PROTOCOL.md §6); `base` is not changed.

    - each field in `f` replaces the stored value, stamp, tags and conflict only if `q` is
      greater than the field's stored version (or, for a field not stored, than the
      removal floor `rq`);
    - `part: false` also removes every stored field not in `f` whose version is below `q`;
    - the deleted flag (and delete stamp) is replaced if `q` is greater than its version.
    """
    r = rec if isinstance(rec, RecState) else rec_state(rec)
    out = base.copy() if base is not None else BaseRecord(r.c, r.k, r.s)
    q = r.q
    if q > out.xq:
        out.x = r.x
        out.xh = r.xh if r.x else None
        out.xq = q
    floor = out.rq
    for name, value in r.f.items():
        if q > out.fq.get(name, floor):
            out.f[name] = value
            out.fq[name] = q
            stamp = r.h.get(name)
            if stamp is None:
                out.h.pop(name, None)
            else:
                out.h[name] = stamp
            tags = r.t.get(name)
            if tags is None:
                out.t.pop(name, None)
            else:
                out.t[name] = {m: list(ts) for m, ts in tags.items()}
            cands = r.cf.get(name)
            if cands:
                out.cf[name] = [dict(c) for c in cands]
            else:
                out.cf.pop(name, None)
    if not r.part:
        for name in [n for n, fq in out.fq.items() if fq < q and n not in r.f]:
            _drop_field(out, name)
        out.wq = max(out.wq, q)
        out.rq = max(out.rq, q)
    out.q = max(out.q, q)
    return out


def apply_own_change(base: BaseRecord | None, change: Mapping[str, Any], q: int, dev: str, *,
                     restamped: bool = False) -> BaseRecord:
    """The base after the device's own change was acked at version `q` (PROTOCOL.md §7.4).

    lww/manual values the change wrote are set with the change's stamp (none when the
    server re-stamped it, `rs`) where `q` is newer than the field's version; a `put`
    clears the deleted flag and a `del` sets it and removes the fields older than `q`.
    Counter totals, set members and conflict outcomes are not derived here: the server
    sends them in the ack's `fx` states. `q == 0` (server forgot the outcome) changes
    nothing.
    """
    stamp = None if restamped else f"{change['h']}:{dev}"
    if base is None and q > 0 and change["op"] != "del":
        # A record new to the base (the usual ack of a create): the general path below
        # gives exactly this, one field at a time.
        values = change.get("f") or {}
        return BaseRecord(change["c"], change["k"], change["s"], q, xq=q, f=dict(values),
                          fq=dict.fromkeys(values, q),
                          h={} if stamp is None else dict.fromkeys(values, stamp))
    out = base.copy() if base is not None else BaseRecord(change["c"], change["k"], change["s"])
    if q <= 0:
        return out
    if change["op"] == "del":
        if q > out.xq:
            out.x, out.xh, out.xq = True, stamp, q
        for name in [n for n, fq in out.fq.items() if fq < q]:
            _drop_field(out, name)
        out.rq = max(out.rq, q)
    else:
        if q > out.xq:
            out.x, out.xh, out.xq = False, None, q
        floor = out.rq
        for name, value in (change.get("f") or {}).items():
            if q > out.fq.get(name, floor):
                out.f[name] = value
                out.fq[name] = q
                if stamp is None:
                    out.h.pop(name, None)
                else:
                    out.h[name] = stamp
                out.cf.pop(name, None)
                out.t.pop(name, None)
    out.q = max(out.q, q)
    return out


def apply_ack_record(base: BaseRecord | None, own: Iterable[tuple[Mapping[str, Any], int]],
                     fx: Iterable[wire.Rec | Mapping[str, Any] | RecState], dev: str, *,
                     restamped: frozenset[int] = frozenset()) -> BaseRecord | None:
    """One record's base after an ack: its `fx` states and the own changes acked for it.

    The `fx` states are applied first and the own changes (in `n` order) after, each
    only where its `q` is newer than the field's version. That is the §7.4 rule ("own
    change at q, then the fx states") with the tie decided for the server: an `fx` state
    at the change's own `q` (a lost lww write, a rule's transformation) is the truth
    about that version, so the own value must not mask it.
    """
    out = base
    for rec in fx:
        out = apply_rec(out, rec)
    for change, q in own:
        out = apply_own_change(out, change, q, dev, restamped=change["n"] in restamped)
    return out


def visible_members(tags: Mapping[str, Sequence[str]]) -> list[str]:
    """Sorted members of a set field that still have a live add-tag."""
    return sorted(m for m, ts in tags.items() if ts)


__all__ = [
    "BaseRecord",
    "RecState",
    "apply_ack_record",
    "apply_own_change",
    "apply_rec",
    "rec_state",
    "visible_members",
]
