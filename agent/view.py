"""The local view of a record: its authoritative base with the pending outbox changes on top.

Pure: no I/O. PROTOCOL.md §9.1: "The local view of a record is its authoritative base
with every outbox change still pending applied on top, in `n` order." The view mirrors
the server's merge rules (§5), so that what the app sees while offline is what the
server will most likely decide:

- lww / manual: a pending value shows only if its stamp is higher than the stamp of the
  field's current value (the base's, or an earlier pending write's);
- counter: base total plus every pending increment;
- set: a member shows while it has a live add-tag: the base's tags plus the pending adds'
  tags (`{dev}:{n}`), minus the tags named by pending removes (add wins);
- del: with stamp D, drops every lww/manual value stamped before D and every set
  member, keeps counter totals (hidden while deleted); the record is deleted unless a
  value stamped after D remains. A later put revives it with only the fields written
  after D (and the counters). A put stamped before a delete already in the base is
  discarded, as the server would discard it.

`compute_view` is a left fold of `step` over the pending changes, so a new local write
updates a stored view with one `step` (`apply_pending`) instead of re-reading every
pending change; the stored `ViewState` is exactly the fold's state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.base import BaseRecord, Candidates, Tags, visible_members
from schemas.collection import CollectionSpec

SyncState = Literal["synced", "pending", "conflict"]


@dataclass(slots=True)
class ViewState:
    """What the device shows for one record, plus what the fold needs to continue."""

    c: str
    k: str
    s: str
    f: dict[str, Any] = field(default_factory=dict)
    """Field values: lww/manual value, counter total, set members (sorted)."""
    h: dict[str, str] = field(default_factory=dict)
    """Stamp of each lww/manual value shown."""
    t: dict[str, Tags] = field(default_factory=dict)
    """Live add-tags of each set field."""
    x: bool = False
    xh: str | None = None
    p: int = 0
    """Number of pending outbox changes folded in."""
    pf: list[str] = field(default_factory=list)
    """Fields named by pending changes (sorted)."""
    pd: bool = False
    """A pending change deletes the record."""
    cf: dict[str, Candidates] = field(default_factory=dict)
    """Open manual conflicts in the base: field -> candidates."""
    q: int = 0
    """Version of the base (0: the server has not confirmed the record yet)."""
    wq: int = 0
    """The base's last whole-state version (for the base version `b` of new changes)."""
    hb: bool = False
    """A base record exists."""

    def copy(self) -> ViewState:
        return ViewState(self.c, self.k, self.s, dict(self.f), dict(self.h), dict(self.t),
                         self.x, self.xh, self.p, list(self.pf), self.pd, dict(self.cf),
                         self.q, self.wq, self.hb)

    def to_doc(self) -> dict[str, Any]:
        return {"s": self.s, "f": self.f, "h": self.h, "t": self.t, "x": self.x, "xh": self.xh,
                "p": self.p, "pf": self.pf, "pd": self.pd, "cf": self.cf, "q": self.q,
                "wq": self.wq, "hb": self.hb}

    @classmethod
    def from_doc(cls, c: str, k: str, doc: Mapping[str, Any]) -> ViewState:
        return cls(c, k, doc["s"], dict(doc["f"]), dict(doc["h"]), dict(doc["t"]), doc["x"],
                   doc["xh"], doc["p"], list(doc["pf"]), doc["pd"], dict(doc["cf"]), doc["q"],
                   doc["wq"], doc["hb"])

    @property
    def fields(self) -> dict[str, Any]:
        """The visible field values (none while deleted)."""
        return {} if self.x else dict(self.f)

    def sync_state(self) -> dict[str, SyncState]:
        """Per visible field: pending (a local change waits), conflict (open), or synced."""
        pending = set(self.pf)
        out: dict[str, SyncState] = {}
        for name in self.fields:
            if name in pending or self.pd:
                out[name] = "pending"
            elif name in self.cf:
                out[name] = "conflict"
            else:
                out[name] = "synced"
        return out


def initial_view(base: BaseRecord | None, c: str, k: str, s: str) -> ViewState:
    """The view of a record with no pending changes."""
    if base is None:
        return ViewState(c, k, s, x=False)
    tags = {name: {m: list(ts) for m, ts in mt.items()} for name, mt in base.t.items()}
    return ViewState(c, k, base.s, dict(base.f), dict(base.h), tags,
                     base.x, base.xh, 0, [], False,
                     {name: [dict(cand) for cand in cands] for name, cands in base.cf.items()},
                     base.q, base.wq, True)


def _strategy(spec: CollectionSpec | None, name: str, state: ViewState) -> str:
    fspec = spec.fields.get(name) if spec is not None else None
    if fspec is not None:
        return fspec.strategy
    if name in state.t:
        return "set"
    if name in state.h:
        return "lww"
    return "counter" if isinstance(state.f.get(name), int | float) else "lww"


def step(state: ViewState, change: Mapping[str, Any], dev: str,
         spec: CollectionSpec | None = None) -> None:
    """Fold one pending change (a wire change dict) into `state`, in place."""
    stamp = f"{change['h']}:{dev}"
    state.p += 1
    if change["op"] == "del":
        state.pd = True
        if state.xh is None or stamp > state.xh:
            state.xh = stamp
        alive = False
        for name in list(state.f):
            strategy = _strategy(spec, name, state)
            if strategy == "counter":
                continue
            if strategy == "set":
                state.f.pop(name, None)
                state.t.pop(name, None)
                continue
            cur = state.h.get(name)
            if cur is None or cur < stamp:
                state.f.pop(name, None)
                state.h.pop(name, None)
            else:
                alive = True
        state.x = not alive
        return
    values = change.get("f")
    incs = change.get("i")
    adds: Mapping[str, list[str]] = change.get("a") or {}
    removes: Mapping[str, Mapping[str, list[str]]] = change.get("r") or {}
    named = set(state.pf)
    for group in (values, incs, adds, removes):
        if group:
            named.update(group)
    state.pf = sorted(named)
    shown = state.f
    if incs:
        for name, inc in incs.items():
            cur = shown.get(name)
            base_total = cur if isinstance(cur, int | float) and not isinstance(cur, bool) else 0
            shown[name] = base_total + inc
    if state.x and state.xh is not None and stamp < state.xh:
        return  # written before a delete the device already knows: discarded (§5 delete)
    state.x = False
    if values:
        stamps = state.h
        for name, value in values.items():
            cur = stamps.get(name)
            if cur is None or stamp > cur:
                shown[name] = value
                stamps[name] = stamp
    if not adds and not removes:
        return
    for name in set(adds) | set(removes):
        tags = {m: list(ts) for m, ts in state.t.get(name, {}).items()}
        for member, seen in removes.get(name, {}).items():
            live = [tag for tag in tags.get(member, ()) if tag not in seen]
            if live:
                tags[member] = live
            else:
                tags.pop(member, None)
        if name in adds:
            tag = f"{dev}:{change['n']}"
            for member in adds[name]:
                have = tags.setdefault(member, [])
                if tag not in have:
                    have.append(tag)
        state.t[name] = tags
        state.f[name] = visible_members(tags)


def apply_pending(state: ViewState, change: Mapping[str, Any], dev: str,
                  spec: CollectionSpec | None = None) -> ViewState:
    """A new view: `state` with one more pending change on top (`state` is unchanged)."""
    out = state.copy()
    step(out, change, dev, spec)
    return out


def compute_view(base: BaseRecord | None, pending: Iterable[Mapping[str, Any]],
                 spec: CollectionSpec | None, dev: str, *, c: str | None = None,
                 k: str | None = None, s: str | None = None) -> ViewState | None:
    """The view of a record: `base` with `pending` (wire change dicts, in `n` order) on top.

    None when there is neither a base nor a pending change (the record is unknown).
    """
    changes = list(pending)
    if base is None and not changes:
        return None
    if base is None:
        first = changes[0]
        state = initial_view(None, c or first["c"], k or first["k"], s or first["s"])
    else:
        state = initial_view(base, base.c, base.k, base.s)
    for change in changes:
        step(state, change, dev, spec)
    return state


__all__ = [
    "SyncState",
    "ViewState",
    "apply_pending",
    "compute_view",
    "initial_view",
    "step",
]
