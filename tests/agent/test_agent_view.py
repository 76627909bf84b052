"""The local view: base plus pending changes, mirroring the server's merge rules (§5, §9.1)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.base import BaseRecord, apply_rec
from agent.view import apply_pending, compute_view, initial_view
from schemas.collection import Catalog

DEV = "van-1"


def tp(ms: int, counter: int = 0) -> str:
    return f"{ms:012x}{counter:04x}"


def change(n: int, ms: int, op: str = "put", **groups: Any) -> dict[str, Any]:
    ch = {"n": n, "h": tp(ms), "c": "tasks", "k": "k1", "s": "route-42", "b": 0, "op": op}
    ch.update({g: v for g, v in groups.items() if v})
    return ch


def base_with(f: dict[str, Any], h: dict[str, str] | None = None,
              t: dict[str, dict[str, list[str]]] | None = None, q: int = 5) -> BaseRecord:
    return apply_rec(None, {"c": "tasks", "k": "k1", "s": "route-42", "q": q, "f": f,
                            "h": h or {}, "t": t or {}})


@settings(max_examples=300, deadline=None)
@given(base_ms=st.one_of(st.none(), st.integers(100, 200)),
       writes=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3)), max_size=6))
def test_lww_shows_the_value_with_the_highest_stamp(catalog: Catalog, base_ms: int | None,
                                                    writes: list[tuple[int, int]]) -> None:
    """lww: a pending value shows only if its stamp beats the base's (and earlier ones)."""
    spec = catalog.collections["tasks"]
    base = None if base_ms is None else base_with({"status": "base"},
                                                  {"status": f"{tp(base_ms)}:van-7"})
    pending = []
    ms = 140
    candidates: list[tuple[str, Any]] = [] if base_ms is None else [
        (f"{tp(base_ms)}:van-7", "base")]
    for n, (value, step) in enumerate(writes, start=1):
        ms += step * 10
        pending.append(change(n, ms, f={"status": f"v{value}"}))
        candidates.append((f"{tp(ms)}:{DEV}", f"v{value}"))
    view = compute_view(base, pending, spec, DEV, c="tasks", k="k1", s="route-42")
    if not candidates:
        assert view is None
        return
    assert view is not None
    assert view.fields["status"] == max(candidates)[1]
    assert view.p == len(pending)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(-50, 50), incs=st.lists(st.integers(-5, 5).filter(bool), max_size=8))
def test_counter_is_base_total_plus_pending_increments(catalog: Catalog, total: int,
                                                       incs: list[int]) -> None:
    """counter: the view is the base total plus every pending increment."""
    spec = catalog.collections["tasks"]
    base = base_with({"attempts": total})
    pending = [change(n, 1000 + n, i={"attempts": inc}) for n, inc in enumerate(incs, 1)]
    view = compute_view(base, pending, spec, DEV)
    assert view is not None
    assert view.fields["attempts"] == total + sum(incs)


@st.composite
def set_scenarios(draw: st.DrawFn) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    base_tags = {m: draw(st.lists(st.sampled_from(["van-7:1", "van-8:2"]), min_size=1,
                                  max_size=2, unique=True))
                 for m in draw(st.lists(st.sampled_from("abc"), unique=True, max_size=3))}
    known: dict[str, set[str]] = {m: set(ts) for m, ts in base_tags.items()}
    pending = []
    for n in range(1, draw(st.integers(0, 6)) + 1):
        if draw(st.booleans()):
            members = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=2, unique=True))
            pending.append(change(n, 1000 + n, a={"labels": members}))
            for m in members:
                known.setdefault(m, set()).add(f"{DEV}:{n}")
        else:
            member = draw(st.sampled_from("abcd"))
            seen = sorted(known.get(member, set()))
            subset = draw(st.lists(st.sampled_from(seen), unique=True)) if seen else []
            if subset:
                pending.append(change(n, 1000 + n, r={"labels": {member: subset}}))
    return base_tags, pending


@settings(max_examples=300, deadline=None)
@given(scenario=set_scenarios())
def test_set_member_shows_while_it_has_a_live_tag(
        catalog: Catalog, scenario: tuple[dict[str, list[str]], list[dict[str, Any]]]) -> None:
    """set: a member is visible iff some add-tag (base or pending) is not named by a later
    remove; a base tag no remove named keeps the member (add wins)."""
    spec = catalog.collections["tasks"]
    base_tags, pending = scenario
    base = base_with({"labels": sorted(base_tags)}, t={"labels": base_tags})
    view = compute_view(base, pending, spec, DEV)
    assert view is not None
    adds: list[tuple[int, str, str]] = [(0, m, tag) for m, ts in base_tags.items() for tag in ts]
    removes: list[tuple[int, str, set[str]]] = []
    for ch in pending:
        for m in ch.get("a", {}).get("labels", []):
            adds.append((ch["n"], m, f"{DEV}:{ch['n']}"))
        for m, tags in ch.get("r", {}).get("labels", {}).items():
            removes.append((ch["n"], m, set(tags)))
    expected = sorted({m for n, m, tag in adds
                       if not any(rn > n and rm == m and tag in rt for rn, rm, rt in removes)})
    assert view.fields.get("labels", []) == expected


@settings(max_examples=100, deadline=None)
@given(scenario=set_scenarios())
def test_incremental_view_equals_full_recomputation(
        catalog: Catalog, scenario: tuple[dict[str, list[str]], list[dict[str, Any]]]) -> None:
    """Folding one pending change at a time gives the same view as recomputing."""
    spec = catalog.collections["tasks"]
    base_tags, pending = scenario
    base = base_with({"labels": sorted(base_tags), "status": "x"},
                     {"status": f"{tp(1001)}:van-7"}, {"labels": base_tags})
    state = initial_view(base, "tasks", "k1", "route-42")
    for ch in pending:
        state = apply_pending(state, ch, DEV, spec)
    assert state == compute_view(base, pending, spec, DEV)


def test_pending_delete_hides_the_record(catalog: Catalog) -> None:
    """A pending delete makes the record deleted with no visible fields."""
    spec = catalog.collections["tasks"]
    base = base_with({"status": "out", "attempts": 2}, {"status": f"{tp(100)}:van-7"})
    view = compute_view(base, [change(1, 500, "del")], spec, DEV)
    assert view is not None and view.x and view.fields == {}


def test_put_after_pending_delete_revives_with_only_new_fields(catalog: Catalog) -> None:
    """A put after a pending delete revives the record with only the fields written after
    it; counter totals survive the delete."""
    spec = catalog.collections["tasks"]
    base = base_with({"status": "out", "notes": "n", "attempts": 2, "labels": ["a"]},
                     {"status": f"{tp(100)}:van-7", "notes": f"{tp(100)}:van-7"},
                     {"labels": {"a": ["van-7:1"]}})
    pending = [change(1, 500, "del"), change(2, 600, f={"status": "again"})]
    view = compute_view(base, pending, spec, DEV)
    assert view is not None and not view.x
    assert view.fields == {"status": "again", "attempts": 2}


def test_delete_loses_to_a_later_base_value(catalog: Catalog) -> None:
    """A pending delete older than a base value (written later elsewhere) does not hide it."""
    spec = catalog.collections["tasks"]
    base = base_with({"status": "newer", "notes": "older"},
                     {"status": f"{tp(900)}:van-7", "notes": f"{tp(100)}:van-7"})
    view = compute_view(base, [change(1, 500, "del")], spec, DEV)
    assert view is not None and not view.x
    assert view.fields == {"status": "newer"}


def test_put_stamped_before_a_known_delete_is_discarded(catalog: Catalog) -> None:
    """A pending put older than the base's delete does not revive it; increments still count."""
    spec = catalog.collections["tasks"]
    base = apply_rec(None, {"c": "tasks", "k": "k1", "s": "route-42", "q": 9, "x": True,
                            "xh": f"{tp(900)}:van-7"})
    view = compute_view(base, [change(1, 500, f={"status": "late"}, i={"attempts": 1})],
                        spec, DEV)
    assert view is not None and view.x and view.f.get("attempts") == 1
    assert "status" not in view.f


def test_pending_only_record_without_base(catalog: Catalog) -> None:
    """A record created locally shows its pending writes, version 0, all fields pending."""
    spec = catalog.collections["tasks"]
    view = compute_view(None, [change(1, 100, f={"route": "route-42", "status": "new"})], spec,
                        DEV)
    assert view is not None
    assert view.fields == {"route": "route-42", "status": "new"}
    assert view.q == 0 and not view.hb
    assert set(view.sync_state().values()) == {"pending"}


def test_open_conflict_shows_in_the_view(catalog: Catalog) -> None:
    """An open manual conflict in the base is listed and marks its field."""
    spec = catalog.collections["tasks"]
    cands = [{"v": "Dock 4", "by": "van-7", "h": f"{tp(5)}:van-7"}]
    base = apply_rec(None, {"c": "tasks", "k": "k1", "s": "route-42", "q": 5,
                            "f": {"address": "Gate 1"}, "h": {"address": f"{tp(4)}:van-3"},
                            "cf": {"address": cands}})
    view = compute_view(base, [], spec, DEV)
    assert view is not None
    assert view.cf == {"address": cands}
    assert view.sync_state() == {"address": "conflict"}


def test_no_base_and_no_pending_is_no_view(catalog: Catalog) -> None:
    """A record with neither base nor pending change has no view."""
    assert compute_view(None, [], catalog.collections["tasks"], DEV) is None
