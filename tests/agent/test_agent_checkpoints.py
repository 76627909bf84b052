"""Per-scope checkpoints: contiguous advance, gaps, pages, snapshots (§9.4, §9.5)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.checkpoints import ScopeCheckpoint


def test_advances_only_while_contiguous() -> None:
    """cp moves over received sequences only while there is no gap."""
    cp = ScopeCheckpoint().mark(1, 0).mark(3, 10)
    assert cp.cp == 1 and cp.seen == (3,) and cp.gap_since == 10
    cp = cp.mark(2, 20)
    assert cp.cp == 3 and cp.seen == () and cp.gap_since is None


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(1, 30))), st.lists(st.integers(1, 29), max_size=10))
def test_any_arrival_order_reaches_the_end(order: list[int], dups: list[int]) -> None:
    """Every sequence received once or more, in any order: cp ends at the last one."""
    cp = ScopeCheckpoint()
    for q in [*order, *dups]:
        cp = cp.mark(q, 0)
    assert cp.cp == 29 and cp.seen == () and not cp.has_gap


def test_page_from_beyond_cp_does_not_skip() -> None:
    """A page continuing from further than cp (an earlier page lost) does not move cp."""
    cp = ScopeCheckpoint(cp=10).page(20, 30, 5)
    assert cp.cp == 10 and cp.has_gap and cp.head == 30
    cp = cp.page(10, 20, 6).page(20, 30, 7)
    assert cp.cp == 30 and not cp.has_gap


def test_checkpoint_ahead_is_a_gap_not_a_jump() -> None:
    """A checkpoint message ahead of the data received opens a gap instead of moving cp."""
    cp = ScopeCheckpoint(cp=5).complete(8, 100)
    assert cp.cp == 5 and cp.has_gap and cp.gap_age_ms(1100) == 1000
    for q in (6, 7, 8):
        cp = cp.mark(q, 200)
    assert cp.cp == 8 and not cp.has_gap


def test_snapshot_restarts_from_the_page() -> None:
    """A reset page sets cp to its `to` (even lower) and records the snapshot."""
    cp = ScopeCheckpoint(cp=50, seen=(55,)).start_snapshot(20, gen=3, req="c-1", now_ms=0)
    assert cp.cp == 20 and cp.snapshot and cp.snap_gen == 3 and cp.seen == (55,)
    assert not cp.end_snapshot().snapshot


def test_round_trips_through_its_stored_form() -> None:
    """A checkpoint survives to_doc/from_doc."""
    cp = ScopeCheckpoint(cp=3, seen=(5, 9), head=9, gap_since=7, snap_gen=2, snap_req="r")
    assert ScopeCheckpoint.from_doc(cp.to_doc()) == cp
    assert ScopeCheckpoint.from_doc(None) == ScopeCheckpoint()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5), st.lists(st.integers(1, 30), max_size=8),
       st.integers(0, 40), st.one_of(st.none(), st.integers(0, 50)),
       st.lists(st.tuples(st.lists(st.integers(-2, 40), max_size=12), st.integers(0, 100)),
                max_size=4),
       st.integers(1, 4))
def test_mark_all_is_mark_of_each_in_order(cp: int, seen: list[int], head: int,
                                           since: int | None,
                                           rounds: list[tuple[list[int], int]],
                                           max_seen: int) -> None:
    import agent.checkpoints as checkpoints

    seen_sorted = tuple(sorted({q for q in seen if q > cp + 1}))
    start = ScopeCheckpoint(cp, seen_sorted, max(head, cp), since)
    saved = checkpoints.MAX_SEEN
    checkpoints.MAX_SEEN = max_seen  # small, so the truncation of `seen` is exercised
    try:
        one, many = start, start
        for qs, now in rounds:
            for q in qs:
                one = one.mark(q, now)
            many = many.mark_all(qs, now)
            assert many == one
    finally:
        checkpoints.MAX_SEEN = saved
