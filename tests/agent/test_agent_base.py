"""The base record: applying record states (PROTOCOL.md §6) and own acked changes (§7.4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.base import BaseRecord, apply_ack_record, apply_own_change, apply_rec

FIELDS = ("a", "b", "c", "tg", "m")


def stamp(q: int, node: str = "van-7") -> str:
    return f"{0x0190_0000_0000 + q:012x}0000:{node}"


@dataclass
class Version:
    """The true record at one version, and what changed at it."""

    q: int
    fields: dict[str, Any]
    h: dict[str, str]
    t: dict[str, dict[str, list[str]]]
    cf: dict[str, list[dict[str, Any]]]
    x: bool
    xh: str | None
    changed: list[str] = field(default_factory=list)
    kind: str = "set"

    def whole(self) -> dict[str, Any]:
        return {"c": "tasks", "k": "k1", "s": "route-42", "q": self.q, "part": False,
                "x": self.x, "xh": self.xh, "f": dict(self.fields) if not self.x else {},
                "h": {n: self.h[n] for n in self.fields if n in self.h} if not self.x else {},
                "t": dict(self.t) if not self.x else {},
                "cf": dict(self.cf) if not self.x else {}}

    def part(self) -> dict[str, Any]:
        names = self.changed
        return {"c": "tasks", "k": "k1", "s": "route-42", "q": self.q, "part": True,
                "f": {n: self.fields[n] for n in names},
                "h": {n: self.h[n] for n in names if n in self.h},
                "t": {n: self.t[n] for n in names if n in self.t},
                "cf": {n: self.cf[n] for n in names if n in self.cf}}


@st.composite
def histories(draw: st.DrawFn) -> list[Version]:
    """A random history of one record: field writes, deletes and revivals."""
    out: list[Version] = []
    cur: dict[str, Any] = {}
    h: dict[str, str] = {}
    t: dict[str, dict[str, list[str]]] = {}
    cf: dict[str, list[dict[str, Any]]] = {}
    for q in range(1, draw(st.integers(1, 8)) + 1):
        kind = draw(st.sampled_from(["set", "set", "set", "del"]))
        if kind == "del":
            cur, h, t, cf = {}, {}, {}, {}
            out.append(Version(q, {}, {}, {}, {}, True, stamp(q), [], "del"))
            continue
        names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
        cur, h, t, cf = dict(cur), dict(h), dict(t), dict(cf)
        for name in names:
            if name == "tg":
                members = draw(st.lists(st.sampled_from("xyz"), max_size=3, unique=True))
                t["tg"] = {m: [f"van-7:{q}"] for m in members}
                cur["tg"] = sorted(members)
            else:
                cur[name] = draw(st.one_of(st.none(), st.integers(0, 9), st.text(max_size=2)))
                h[name] = stamp(q)
                if name == "m" and draw(st.booleans()):
                    cf["m"] = [{"v": q, "by": "van-3", "h": stamp(q, "van-3")}]
                else:
                    cf.pop(name, None)
        out.append(Version(q, dict(cur), dict(h), dict(t), dict(cf), False, None, names))
    return out


RecSet = tuple[list[Version], list[dict[str, Any]]]


@st.composite
def rec_sets(draw: st.DrawFn) -> RecSet:
    history = draw(histories())
    recs: list[dict[str, Any]] = []
    for version in history:
        choice = draw(st.sampled_from(["none", "whole", "part", "both"]))
        if version.kind == "del" and choice in ("part", "both"):
            choice = "whole"
        if choice in ("whole", "both"):
            recs.append(version.whole())
        if choice in ("part", "both"):
            recs.append(version.part())
    return history, recs


def apply_all(recs: list[dict[str, Any]]) -> BaseRecord | None:
    base = None
    for rec in recs:
        base = apply_rec(base, rec)
    return base


@settings(max_examples=300, deadline=None)
@given(data=st.data(), pair=rec_sets())
def test_any_order_and_duplicates_give_the_same_base(data: st.DataObject, pair: RecSet) -> None:
    """Applying a set of record states in any order, with duplicates, gives one base."""
    _, recs = pair
    if not recs:
        return
    reference = apply_all(sorted(recs, key=lambda r: (r["q"], r["part"])))
    shuffled = data.draw(st.permutations(recs))
    extra = data.draw(st.lists(st.sampled_from(recs), max_size=4))
    mixed = list(shuffled)
    for item in extra:
        mixed.insert(data.draw(st.integers(0, len(mixed))), item)
    assert apply_all(mixed) == reference


@settings(max_examples=200, deadline=None)
@given(pair=rec_sets())
def test_applying_a_state_twice_changes_nothing(pair: RecSet) -> None:
    """Record states are idempotent: a repeated state leaves the base as it was."""
    _, recs = pair
    base = apply_all(recs)
    for rec in recs:
        assert apply_rec(base, rec) == base


@settings(max_examples=200, deadline=None)
@given(data=st.data(), pair=rec_sets())
def test_with_the_latest_whole_state_the_base_equals_the_truth(data: st.DataObject,
                                                               pair: RecSet) -> None:
    """Whatever else arrived, once the newest whole state is in, fields and flag match it."""
    history, recs = pair
    latest = history[-1]
    mixed = data.draw(st.permutations([*recs, latest.whole()]))
    base = apply_all(mixed)
    assert base is not None
    assert base.x == latest.x
    assert base.f == (latest.fields if not latest.x else {})
    assert base.t == ({} if latest.x else latest.t)
    assert base.cf == ({} if latest.x else latest.cf)


def test_part_state_leaves_unlisted_fields_alone() -> None:
    """part: true changes only the fields it lists."""
    base = apply_rec(None, {"c": "tasks", "k": "k", "s": "r", "q": 3, "f": {"a": 1, "b": 2}})
    base = apply_rec(base, {"c": "tasks", "k": "k", "s": "r", "q": 4, "part": True, "f": {"a": 5}})
    assert base.f == {"a": 5, "b": 2}
    assert base.fq == {"a": 4, "b": 3}
    assert base.wq == 3


def test_whole_state_removes_older_fields_but_keeps_newer_ones() -> None:
    """part: false removes fields not listed whose version is lower, keeps newer ones."""
    base = apply_rec(None, {"c": "t", "k": "k", "s": "r", "q": 2, "f": {"a": 1}})
    base = apply_rec(base, {"c": "t", "k": "k", "s": "r", "q": 9, "part": True, "f": {"b": 7}})
    base = apply_rec(base, {"c": "t", "k": "k", "s": "r", "q": 5, "f": {"c": 3}})
    assert base.f == {"b": 7, "c": 3}


def test_old_part_state_cannot_resurrect_a_field_a_whole_state_removed() -> None:
    """A late partial state older than the whole state that removed its field is ignored."""
    base = apply_rec(None, {"c": "t", "k": "k", "s": "r", "q": 5, "f": {"b": 1}})
    base = apply_rec(base, {"c": "t", "k": "k", "s": "r", "q": 3, "part": True, "f": {"a": 1}})
    assert "a" not in base.f


def test_deleted_flag_follows_the_newest_version() -> None:
    """The deleted flag is replaced only by a newer version; a late older state keeps it."""
    xh = stamp(6)
    base = apply_rec(None, {"c": "t", "k": "k", "s": "r", "q": 6, "x": True, "xh": xh})
    base = apply_rec(base, {"c": "t", "k": "k", "s": "r", "q": 4, "part": True, "f": {"a": 1}})
    assert base.x and base.xh == xh
    base = apply_rec(base, {"c": "t", "k": "k", "s": "r", "q": 8, "part": True, "f": {"a": 2}})
    assert not base.x and base.f == {"a": 2} and base.xh is None


def test_own_change_sets_lww_values_with_its_stamp() -> None:
    """An acked own put sets its lww values with its own stamp at version q."""
    base = apply_rec(None, {"c": "tasks", "k": "k", "s": "r", "q": 3, "f": {"status": "a"},
                            "h": {"status": stamp(3)}})
    change = {"n": 7, "h": "0191000000000000", "c": "tasks", "k": "k", "s": "r", "b": 3,
              "op": "put", "f": {"status": "b"}, "i": {"attempts": 1}}
    out = apply_own_change(base, change, 4, "van-1")
    assert out.f == {"status": "b"}
    assert out.h["status"] == "0191000000000000:van-1"
    assert out.fq["status"] == 4
    assert base.f == {"status": "a"}, "the input is not modified"


def test_own_change_older_than_the_field_changes_nothing() -> None:
    """An own change acked at a version older than the field's keeps the newer value."""
    base = apply_rec(None, {"c": "tasks", "k": "k", "s": "r", "q": 9, "f": {"status": "new"}})
    change = {"n": 1, "h": "0191000000000000", "c": "tasks", "k": "k", "s": "r", "b": 0,
              "op": "put", "f": {"status": "old"}}
    assert apply_own_change(base, change, 5, "van-1").f == {"status": "new"}


def test_own_delete_removes_older_fields() -> None:
    """An acked own delete sets the flag and drops every field older than q."""
    base = apply_rec(None, {"c": "t", "k": "k", "s": "r", "q": 2, "f": {"a": 1}})
    change = {"n": 2, "h": "0191000000000000", "c": "t", "k": "k", "s": "r", "b": 2, "op": "del"}
    out = apply_own_change(base, change, 3, "van-1")
    assert out.x and out.f == {} and out.xh == "0191000000000000:van-1"
    late = apply_rec(out, {"c": "t", "k": "k", "s": "r", "q": 2, "part": True, "f": {"a": 1}})
    assert late.f == {}, "a late older state cannot bring a field back"


def test_fx_at_the_changes_own_version_wins_over_the_own_value() -> None:
    """A lost lww write: the fx state at the change's q decides, not the device's value."""
    change = {"n": 1, "h": "0191000000000000", "c": "tasks", "k": "k", "s": "r", "b": 0,
              "op": "put", "f": {"status": "mine"}}
    fx = {"c": "tasks", "k": "k", "s": "r", "q": 4, "part": True, "f": {"status": "theirs"},
          "h": {"status": "0192000000000000:van-7"}}
    out = apply_ack_record(None, [(change, 4)], [fx], "van-1")
    assert out is not None
    assert out.f == {"status": "theirs"}
    assert out.h["status"] == "0192000000000000:van-7"


def test_restamped_change_keeps_no_stamp() -> None:
    """A change the server re-stamped (rs) is applied without the device's own stamp."""
    change = {"n": 3, "h": "0191000000000000", "c": "t", "k": "k", "s": "r", "b": 0,
              "op": "put", "f": {"a": 1}}
    out = apply_ack_record(None, [(change, 2)], [], "van-1", restamped=frozenset({3}))
    assert out is not None and out.f == {"a": 1} and "a" not in out.h


def test_q_zero_ack_changes_nothing() -> None:
    """An ack with q = 0 (outcome forgotten by the server) leaves the base as it was."""
    change = {"n": 3, "h": "0191000000000000", "c": "t", "k": "k", "s": "r", "b": 0,
              "op": "put", "f": {"a": 1}}
    assert apply_own_change(None, change, 0, "van-1").f == {}


def test_docs_round_trip() -> None:
    """A base record survives its stored form (record doc + stamps doc)."""
    base = apply_rec(None, {"c": "t", "k": "k", "s": "r", "q": 2, "f": {"a": 1, "tg": ["x"]},
                            "h": {"a": stamp(2)}, "t": {"tg": {"x": ["van-1:1"]}},
                            "cf": {"a": [{"v": 2, "by": "van-2", "h": stamp(1, "van-2")}]}})
    doc, stamps = base.to_docs()
    assert BaseRecord.from_docs("t", "k", doc, stamps) == base
