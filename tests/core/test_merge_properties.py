"""Property tests of the merge core: convergence, no lost increments, complete conflict log.

A generated history is several devices, each with its own hybrid logical clock (skewed,
jumping), writing offline to one or two records of a collection with one field per
strategy (`lw` lww, `mn` manual, `ct` counter, `st` set) plus deletes, and syncing now
and then with an origin server (which gives later changes realistic bases `b` and lets
the devices observe stamps and set tags). The properties then replay the same changes
at a server in arbitrary orders with arbitrary duplicates (deduplicated by change id,
exactly like the server) and compare against independently computed ground truth.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.collection import parse_catalog
from schemas.wire import Change, Rec
from waystation.hlc import Clock, Stamp
from waystation.merge import (
    ConflictEntry,
    Counter,
    RecordState,
    Register,
    apply_change,
    latest_stamp,
    to_json,
    to_rec,
)

T0 = 1_764_000_000_000
SPEC = parse_catalog({
    "version": 1,
    "collections": {"things": {"scope": "s1", "fields": {
        "lw": {"type": "int"},
        "mn": {"type": "int", "merge": "manual"},
        "ct": {"type": "int", "merge": "counter"},
        "st": {"type": "set"},
    }}},
}).collections["things"]
DEVICES = ["d0", "d1", "d2", "d3"]
MEMBERS = ["m0", "m1", "m2"]
KINDS = ["lw", "mn", "ct", "add", "rm", "del", "mix"]
SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

Item = tuple[str, Change]  # (device, change)


def cid(dev: str, ch: Change) -> str:
    return f"{dev}:{ch.n}"


def stamp_of(dev: str, ch: Change) -> Stamp:
    return Stamp.from_time_part(ch.h, dev)


# --- the server replay ------------------------------------------------------------------


@dataclass
class Server:
    """A minimal server: dedupe by change id, one sequence for the scope, records by key."""

    records: dict[str, RecordState] = field(default_factory=dict)
    q: int = 0
    seen: set[str] = field(default_factory=set)
    q_of: dict[str, int] = field(default_factory=dict)
    log: list[ConflictEntry] = field(default_factory=list)
    applied: list[Item] = field(default_factory=list)

    def apply(self, dev: str, ch: Change) -> bool:
        """Apply unless this change id was seen; True if it was applied now."""
        key = cid(dev, ch)
        if key in self.seen:
            return False
        before = self.records.get(ch.k)
        snapshot = to_json(before) if before is not None else None
        out = apply_change(before, ch, dev, self.q + 1, SPEC)
        if not out.applied:
            # property (6): a rejected change leaves the record exactly as it was
            assert out.record is before
            assert (to_json(before) if before is not None else None) == snapshot
            return False
        self.seen.add(key)
        self.q += 1
        self.q_of[key] = self.q
        assert out.record is not None and out.record.q == self.q
        self.records[ch.k] = out.record
        self.log.extend(out.conflicts)
        self.applied.append((dev, ch))
        return True


def replay(items: Iterable[Item]) -> Server:
    server = Server()
    for dev, ch in items:
        server.apply(dev, ch)
    return server


# --- history generation -----------------------------------------------------------------


@dataclass
class Device:
    name: str
    clock: Clock
    n: int = 0
    b: int = 0
    pending: list[Change] = field(default_factory=list)
    tags: dict[str, dict[str, set[str]]] = field(default_factory=dict)


@dataclass
class History:
    items: list[Item]
    keys: list[str]


def simulate(ndev: int, nkeys: int, skews: list[int], steps: list[tuple[Any, ...]]) -> History:
    """Run the devices against an origin server; return every change in send order."""
    now = [0]
    keys = [f"k{i}" for i in range(nkeys)]
    jumps = [0] * ndev

    def wall(i: int) -> Callable[[], int]:
        return lambda: T0 + now[0] + skews[i] + jumps[i]

    devices = [Device(DEVICES[i], Clock(DEVICES[i], wall(i))) for i in range(ndev)]
    origin = Server()
    items: list[Item] = []

    def sync(d: Device) -> None:
        for ch in d.pending:
            origin.apply(d.name, ch)
        d.pending = []
        d.b = origin.q
        for key in keys:
            rec = origin.records.get(key)
            d.tags[key] = {}
            if rec is None:
                continue
            newest = latest_stamp(rec)
            if newest is not None:
                d.clock.observe(newest)
            st_ = rec.fields.get("st")
            if not rec.deleted and st_ is not None and not isinstance(st_, Register | Counter):
                d.tags[key] = {m: set(t) for m, t in st_.tags.items()}

    for step in steps:
        now[0] += step[-1]
        kind = step[0]
        d = devices[step[1] % ndev]
        if kind == "sync":
            sync(d)
            continue
        if kind == "clock":
            jumps[step[1] % ndev] += step[2]
            continue
        _, _, ki, what, value, _ = step
        key = keys[ki % nkeys]
        d.n += 1
        body: dict[str, Any] = {}
        known = d.tags.setdefault(key, {})
        tag = f"{d.name}:{d.n}"
        if what in ("lw", "mix"):
            body["f"] = {"lw": value}
        if what == "mn":
            body["f"] = {"mn": value}
        if what in ("ct", "mix"):
            body["i"] = {"ct": value - 2 or 1}
        if what in ("add", "mix"):
            member = MEMBERS[value % len(MEMBERS)]
            body["a"] = {"st": [member]}
            known.setdefault(member, set()).add(tag)
        if what == "rm":
            live = sorted(m for m, t in known.items() if t)
            if live:
                member = live[value % len(live)]
                body["r"] = {"st": {member: sorted(known.pop(member))}}
            else:  # names a tag it never saw: a remove that may beat its add
                other = DEVICES[value % ndev]
                body["r"] = {"st": {MEMBERS[value % len(MEMBERS)]: [f"{other}:1"]}}
        op = "del" if what == "del" else "put"
        if op == "del":
            known.clear()
        ch = Change.model_validate({"n": d.n, "h": d.clock.tick().time_part(), "c": "things",
                                    "k": key, "s": "s1", "b": d.b, "op": op, **body})
        d.pending.append(ch)
        items.append((d.name, ch))
    for d in devices:
        sync(d)
    return History(items, keys)


dt = st.integers(min_value=0, max_value=40)
write_step = st.tuples(st.just("w"), st.integers(0, 3), st.integers(0, 1),
                       st.sampled_from(KINDS), st.integers(0, 5), dt)
steps_strategy = st.lists(
    st.one_of(write_step, write_step, write_step,
              st.tuples(st.just("sync"), st.integers(0, 3), dt),
              st.tuples(st.just("clock"), st.integers(0, 3),
                        st.integers(-3000, 3000), dt)),
    min_size=15, max_size=60)
skew_strategy = st.lists(st.sampled_from([0, 0, 5, -5, 700, -700, 60_000]),
                         min_size=4, max_size=4)


@st.composite
def histories(draw: st.DrawFn) -> History:
    ndev = draw(st.integers(min_value=2, max_value=4))
    nkeys = draw(st.integers(min_value=1, max_value=2))
    return simulate(ndev, nkeys, draw(skew_strategy), draw(steps_strategy))


def shuffled(draw: Callable[..., Any], items: list[Item]) -> list[Item]:
    """A random order of `items` with random duplicates mixed in."""
    order = list(draw(st.permutations(items)))
    if items:
        dups = draw(st.lists(st.tuples(st.integers(0, len(items) - 1),
                                       st.integers(0, len(items))), max_size=8))
        for src, pos in dups:
            order.insert(min(pos, len(order)), items[src])
    return order


# --- ground truth -----------------------------------------------------------------------


@dataclass
class Truth:
    deleted: bool
    lw: tuple[Stamp, int] | None
    ct: int | float | None
    st: list[str]


def truth(items: Iterable[Item], key: str) -> Truth:
    """The visible state of `key` computed from the distinct changes alone (no merge code)."""
    distinct = {cid(dev, ch): (dev, ch) for dev, ch in items if ch.k == key}
    dels = [stamp_of(d, ch) for d, ch in distinct.values() if ch.op == "del"]
    puts = [stamp_of(d, ch) for d, ch in distinct.values() if ch.op == "put"]
    xmax = max(dels) if dels else None
    deleted = xmax is not None and (not puts or xmax >= max(puts))
    lws = [(stamp_of(d, ch), ch.f["lw"]) for d, ch in distinct.values() if "lw" in ch.f]
    top = max(lws) if lws else None
    if top is not None and xmax is not None and top[0] <= xmax:
        top = None
    incs = [ch.i["ct"] for _, ch in distinct.values() if "ct" in ch.i]
    adds: dict[tuple[str, str], Stamp] = {}
    removed: set[tuple[str, str]] = set()
    for d, ch in distinct.values():
        for m in ch.a.get("st", []):
            adds[(m, f"{d}:{ch.n}")] = stamp_of(d, ch)
        for m, tags in ch.r.get("st", {}).items():
            removed.update((m, t) for t in tags)
    members = sorted({m for (m, t), s in adds.items()
                      if (m, t) not in removed and (xmax is None or s > xmax)})
    return Truth(deleted, top, sum(incs) if incs else None, members)


def check_truth(server: Server, history: History) -> None:
    for key in history.keys:
        want = truth(history.items, key)
        rec = server.records.get(key)
        if rec is None:
            assert not any(ch.k == key for _, ch in history.items)
            continue
        assert rec.deleted == want.deleted
        counter = rec.fields.get("ct")
        assert (counter.total if isinstance(counter, Counter) else None) == want.ct
        if want.deleted:
            assert rec.values() == {}
            continue
        lw = rec.fields.get("lw")
        got_lw = (lw.value.h, lw.value.v) if isinstance(lw, Register) else None
        assert got_lw == want.lw
        assert rec.value("st", []) == want.st


def visible(server: Server, key: str) -> dict[str, Any] | None:
    """The record state of `key` without its version and its manual field."""
    rec = server.records.get(key)
    if rec is None:
        return None
    state = to_rec(rec)
    state.pop("q")
    for member in ("f", "h", "cf"):
        if member in state:
            state[member].pop("mn", None)
            if not state[member]:
                del state[member]
    return state


# --- properties -------------------------------------------------------------------------


@SETTINGS
@given(histories(), st.data())
def test_any_order_and_duplicates_converge_to_the_same_visible_record(
        history: History, data: st.DataObject) -> None:
    """(1) Same distinct changes, any order, any duplicates: same lww/counter/set/deleted."""
    reference = replay(history.items)
    check_truth(reference, history)
    for _ in range(2):
        server = replay(shuffled(data.draw, history.items))
        check_truth(server, history)
        for key in history.keys:
            assert visible(server, key) == visible(reference, key)
    for rec in reference.records.values():
        Rec.model_validate(to_rec(rec))


@SETTINGS
@given(histories(), st.data())
def test_no_acknowledged_increment_is_ever_lost(history: History, data: st.DataObject) -> None:
    """(2) The counter total is the sum of every distinct applied increment, deletes or not."""
    server = replay(shuffled(data.draw, history.items))
    for key in history.keys:
        incs = {cid(d, ch): ch.i["ct"] for d, ch in server.applied
                if ch.k == key and "ct" in ch.i}
        counter = server.records[key].fields.get("ct") if key in server.records else None
        total = counter.total if isinstance(counter, Counter) else 0
        assert total == sum(incs.values())
        assert len(incs) == len({cid(d, ch) for d, ch in history.items
                                 if ch.k == key and "ct" in ch.i})


def expected_lww_log(server: Server) -> list[tuple[str, str, str, str | None, str]]:
    """Brute force over the apply order: every lww/delete loss on field `lw` that must be logged.

    Entries are (key, kind, loser id, winner id, field). A value is "seen" by a change
    from the same device or whose base covers the sequence the value was applied at.
    """
    out: list[tuple[str, str, str, str | None, str]] = []
    writes: dict[str, list[tuple[Stamp, str, str]]] = {}   # key -> (stamp, dev, id)
    value_of = {cid(dev, ch): ch.f.get("lw") for dev, ch in server.applied}
    dels: dict[str, list[tuple[Stamp, str, str]]] = {}
    for dev, ch in server.applied:
        me = cid(dev, ch)
        hc = stamp_of(dev, ch)
        ws, ds = writes.setdefault(ch.k, []), dels.setdefault(ch.k, [])
        xmax = max(ds)[0] if ds else None

        def saw(w: tuple[Stamp, str, str], dev: str = dev, ch: Change = ch) -> bool:
            return w[1] == dev or ch.b >= server.q_of[w[2]]

        live = [w for w in ws if xmax is None or w[0] > xmax]
        cur = max(live) if live else None
        if ch.op == "del":
            if (xmax is None or hc > xmax) and cur is not None and cur[0] <= hc \
                    and not saw(cur):
                out.append((ch.k, "delete", cur[2], me, "lw"))
            ds.append((hc, dev, me))
        elif "lw" in ch.f:
            if xmax is not None and hc <= xmax:
                x = max(ds)
                if x[1] != dev:
                    out.append((ch.k, "delete", me, x[2], "lw"))
            elif cur is not None and value_of[cur[2]] == ch.f["lw"]:
                pass  # an equal value loses nothing
            elif cur is not None and hc > cur[0]:
                if not saw(cur):
                    out.append((ch.k, "lww", cur[2], me, "lw"))
            elif cur is not None and hc < cur[0] and cur[1] != dev:
                out.append((ch.k, "lww", me, cur[2], "lw"))
            ws.append((hc, dev, me))
    return out


def logged(server: Server) -> list[tuple[str, str, str, str | None, str]]:
    return [(e.k, e.kind, f"{e.loser.by}:{e.loser.n}",
             None if e.winner is None else f"{e.winner.by}:{e.winner.n}", e.field)
            for e in server.log if e.field == "lw"]


@SETTINGS
@given(histories(), st.data())
def test_every_overwritten_concurrent_value_is_in_the_conflict_log(
        history: History, data: st.DataObject) -> None:
    """(3) Each lww value lost to a concurrent write or a delete has exactly one log entry."""
    for items in (history.items, shuffled(data.draw, history.items)):
        server = replay(items)
        assert sorted(logged(server)) == sorted(expected_lww_log(server))
        # the log of a manual field: every final candidate was logged as an open conflict
        for rec in server.records.values():
            reg = rec.fields.get("mn")
            if isinstance(reg, Register):
                for cand in reg.cf:
                    assert any(e.kind == "manual" and e.open and e.loser == cand
                               for e in server.log if e.k == rec.k)


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 4), st.lists(st.integers(1, 3), min_size=4, max_size=4),
       st.lists(st.integers(0, 500), min_size=4, max_size=4), st.data())
def test_manual_concurrent_writes_give_the_same_candidates_in_any_order(
        ndev: int, counts: list[int], skews: list[int], data: st.DataObject) -> None:
    """(1, manual) Mutually concurrent writes: value plus candidates are the same, conflict open."""
    items: list[Item] = []
    newest: dict[str, tuple[Stamp, int]] = {}
    for i in range(ndev):
        dev = DEVICES[i]
        clock = Clock(dev, lambda i=i: T0 + skews[i])  # type: ignore[misc]
        for n in range(1, counts[i] + 1):
            stamp = clock.tick()
            value = 10 * i + n
            items.append((dev, Change.model_validate({
                "n": n, "h": stamp.time_part(), "c": "things", "k": "k0", "s": "s1",
                "b": 0, "op": "put", "f": {"mn": value}})))
            newest[dev] = (stamp, value)
    for _ in range(3):
        server = replay(shuffled(data.draw, items))
        reg = server.records["k0"].fields["mn"]
        assert isinstance(reg, Register)
        got = {(v.by, v.h, v.v) for v in (reg.value, *reg.cf)}
        assert got == {(dev, s, v) for dev, (s, v) in newest.items()}
        assert len(reg.cf) == ndev - 1 > 0
        for cand in reg.cf:
            assert any(e.kind == "manual" and e.open and e.loser == cand for e in server.log)


def set_change(dev: str, n: int, ms: int, b: int, *, add: str | None = None,
               remove: dict[str, list[str]] | None = None) -> Item:
    body: dict[str, Any] = {}
    if add is not None:
        body["a"] = {"st": [add]}
    if remove is not None:
        body["r"] = {"st": remove}
    return dev, Change.model_validate({
        "n": n, "h": Stamp(T0 + ms, 0, dev).time_part(), "c": "things", "k": "k0", "s": "s1",
        "b": b, "op": "put", **body})


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3), st.lists(st.integers(-50, 50), min_size=3, max_size=3),
       st.data())
def test_set_add_wins_and_observed_remove_removes(readds: int, offsets: list[int],
                                                  data: st.DataObject) -> None:
    """(4) A member added concurrently with a remove survives; removing all seen tags removes it."""
    first = set_change("d0", 1, 0, 0, add="m0")
    # d1 saw d0's add (b = 1) and removes the one tag it saw.
    remove = set_change("d1", 1, 100 + offsets[0], 1, remove={"m0": ["d0:1"]})
    # Concurrent re-adds by other devices that never saw the remove.
    adds = [set_change(f"d{2 + i % 2}", 1 + i, 50 + offsets[1] + 10 * i, 0, add="m0")
            for i in range(readds)]
    other = set_change("d0", 2, 10 + offsets[2], 0, add="m1")
    items = [first, remove, *adds, other]
    for _ in range(3):
        server = replay(shuffled(data.draw, items))
        rec = server.records["k0"]
        want = ["m0", "m1"] if readds else ["m1"]
        assert rec.value("st") == want
        if readds:
            live = to_rec(rec)["t"]["st"]["m0"]
            assert sorted(live) == sorted(f"{d}:{ch.n}" for d, ch in adds)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["lw", "ct", "add", "mn"]), min_size=1, max_size=6),
       st.booleans(), st.data())
def test_own_older_writes_never_revive_a_deleted_record(
        kinds: list[str], other_older: bool, data: st.DataObject) -> None:
    """(5) A device's writes stamped before its own delete never bring the record back."""
    clock = Clock("d0", lambda: T0)
    items: list[Item] = []
    for n, kind in enumerate(kinds, start=1):
        bodies: dict[str, dict[str, Any]] = {
            "lw": {"f": {"lw": n}}, "mn": {"f": {"mn": n}}, "ct": {"i": {"ct": n}},
            "add": {"a": {"st": ["m0"]}}}
        body = bodies[kind]
        items.append(("d0", Change.model_validate({
            "n": n, "h": clock.tick().time_part(), "c": "things", "k": "k0", "s": "s1",
            "b": n - 1, "op": "put", **body})))
    if other_older:  # another device's write, stamped before the delete, arriving late
        items.append(("d1", Change.model_validate({
            "n": 1, "h": Stamp(T0 - 10, 0, "d1").time_part(), "c": "things", "k": "k0",
            "s": "s1", "b": 0, "op": "put", "f": {"lw": 99}})))
    delete = ("d0", Change.model_validate({
        "n": len(kinds) + 1, "h": clock.tick().time_part(), "c": "things", "k": "k0",
        "s": "s1", "b": len(kinds), "op": "del"}))
    items.append(delete)
    server = replay(shuffled(data.draw, items))
    rec = server.records["k0"]
    assert rec.deleted and to_rec(rec).get("f") is None
    counter = rec.fields.get("ct")
    assert (counter.total if isinstance(counter, Counter) else 0) == sum(
        ch.i.get("ct", 0) for _, ch in items)
    assert all(e.loser.by == "d1" for e in server.log if e.kind == "delete")


def bad_changes(key: str, n: int) -> list[Change]:
    base = {"c": "things", "k": key, "s": "s1", "b": 0, "op": "put",
            "h": Stamp(T0 + 10**6, 0, "dX").time_part()}
    bodies: list[dict[str, Any]] = [
        {"f": {"nope": 1}}, {"f": {"lw": "text"}}, {"f": {"mn": 1.5}}, {"f": {"ct": 3}},
        {"i": {"lw": 1}}, {"a": {"lw": ["x"]}}, {"r": {"ct": {"x": ["d0:1"]}}},
        {"f": {"st": ["x"]}}, {"f": {"lw": 1}, "s": "elsewhere"},
        {"f": {"lw": 1, "mn": 2}, "i": {"ct": 1}, "a": {"nope": ["x"]}},
    ]
    return [Change.model_validate({**base, "n": n + i, **body}) for i, body in enumerate(bodies)]


@SETTINGS
@given(histories(), st.data())
def test_rejected_changes_leave_the_record_unchanged(history: History,
                                                     data: st.DataObject) -> None:
    """(6) Invalid changes mixed into any order are rejected and change nothing."""
    bad = [("dX", ch) for key in history.keys for ch in bad_changes(key, 1000 * (1 + len(key)))]
    order = shuffled(data.draw, history.items)
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for item in bad:
        order.insert(rng.randint(0, len(order)), item)
    server = replay(order)  # Server.apply asserts each rejection left the record untouched
    assert not any(d == "dX" for d, _ in server.applied)
    check_truth(server, history)
