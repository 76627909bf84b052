"""Hybrid logical clock (docs/PROTOCOL.md §4)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waystation.errors import ClockSkewError
from waystation.hlc import (
    MAX_COUNTER,
    MAX_WALL,
    SERVER_NODE,
    Clock,
    Stamp,
    check_skew,
    parse_time_part,
    too_far_ahead,
)

T0 = 1_764_000_000_000

nodes = st.from_regex(r"\A(~server|[A-Za-z0-9][A-Za-z0-9_.-]{0,12})\Z")
walls = st.integers(min_value=0, max_value=MAX_WALL)
counters = st.integers(min_value=0, max_value=MAX_COUNTER)
stamps = st.builds(Stamp, walls, counters, nodes)


class FakeWall:
    """An injected wall clock the test moves by hand."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


# A step: move the wall clock by `jump` ms (possibly backwards), then tick, or observe a
# remote stamp whose wall lies `offset` ms from the local wall clock.
steps = st.lists(
    st.tuples(
        st.integers(min_value=-600_000, max_value=600_000),
        st.one_of(st.none(), st.tuples(st.integers(-900_000, 900_000), counters, nodes)),
    ),
    min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_tick_and_observe_strictly_increase_under_any_wall_clock(
        ops: list[tuple[int, tuple[int, int, str] | None]]) -> None:
    """Every stamp a clock issues is later than the previous one, whatever the wall does."""
    wall = FakeWall(T0)
    clock = Clock("van-1", wall)
    last = clock.last
    for jump, remote in ops:
        wall.now = max(0, wall.now + jump)
        if remote is None:
            stamp = clock.tick()
        else:
            offset, counter, node = remote
            r = Stamp(max(0, wall.now + offset), counter, node)
            stamp = clock.observe(r)
            assert (stamp.wall, stamp.counter) > (r.wall, r.counter)
            assert stamp > r
        assert (stamp.wall, stamp.counter) > (last.wall, last.counter)
        assert stamp.node == "van-1"
        assert clock.state == (stamp.wall, stamp.counter)
        last = stamp


@settings(max_examples=200, deadline=None)
@given(stamps, st.integers(0, MAX_WALL), st.tuples(walls, counters))
def test_observe_result_is_later_than_the_remote_stamp(remote: Stamp, now: int,
                                                        state: tuple[int, int]) -> None:
    """observe(r) > r and > the clock's previous state, for any state and wall clock."""
    clock = Clock("dev-a", FakeWall(now), *state)
    if max(remote.wall, now, state[0]) >= MAX_WALL:
        return  # the 48-bit wall clock would overflow; covered separately
    before = clock.last
    got = clock.observe(remote)
    assert got > remote
    assert (got.wall, got.counter) > (before.wall, before.counter)


@settings(max_examples=300, deadline=None)
@given(stamps, stamps)
def test_encoded_stamps_sort_like_tuples(a: Stamp, b: Stamp) -> None:
    """String order of full and time-part encodings equals stamp (tuple) order."""
    assert (a.encode() < b.encode()) == (a < b)
    assert (a.encode() == b.encode()) == (a == b)
    ta, tb = a.time_part(), b.time_part()
    assert (ta < tb) == ((a.wall, a.counter) < (b.wall, b.counter))


@settings(max_examples=300, deadline=None)
@given(stamps)
def test_encoding_round_trips(stamp: Stamp) -> None:
    """parse(encode(s)) == s and from_time_part(time_part(s), node) == s."""
    text = stamp.encode()
    assert len(stamp.time_part()) == 16
    assert text == f"{stamp.time_part()}:{stamp.node}"
    assert Stamp.parse(text) == stamp
    assert Stamp.from_time_part(stamp.time_part(), stamp.node) == stamp
    assert parse_time_part(stamp.time_part()) == (stamp.wall, stamp.counter)


def test_time_part_layout_matches_the_protocol_example() -> None:
    """`0192f2a4c9b10003` is wall 0x0192f2a4c9b1, counter 3 (PROTOCOL.md §4)."""
    stamp = Stamp.parse("0192f2a4c9b10003:van-12")
    assert stamp == Stamp(0x0192F2A4C9B1, 3, "van-12")
    assert stamp.encode() == "0192f2a4c9b10003:van-12"


def test_tick_counts_within_a_millisecond_and_resets_on_a_new_one() -> None:
    """Same wall ms: counter + 1; a later wall ms: counter 0."""
    wall = FakeWall(T0)
    clock = Clock("van-1", wall)
    assert clock.tick() == Stamp(T0, 0, "van-1")
    assert clock.tick() == Stamp(T0, 1, "van-1")
    wall.now = T0 + 5
    assert clock.tick() == Stamp(T0 + 5, 0, "van-1")


def test_tick_stays_monotonic_when_the_wall_clock_jumps_back() -> None:
    """A wall clock set back keeps the last wall and counts up instead."""
    wall = FakeWall(T0)
    clock = Clock("van-1", wall)
    clock.tick()
    wall.now = T0 - 60_000
    assert clock.tick() == Stamp(T0, 1, "van-1")


def test_tick_counter_overflow_advances_the_wall_by_one_ms() -> None:
    """Past counter 65535 the clock moves to wall + 1, counter 0."""
    clock = Clock("van-1", FakeWall(T0), T0, MAX_COUNTER - 1)
    assert clock.tick() == Stamp(T0, MAX_COUNTER, "van-1")
    assert clock.tick() == Stamp(T0 + 1, 0, "van-1")
    assert clock.tick() == Stamp(T0 + 1, 1, "van-1")


def test_sixty_five_thousand_ticks_in_one_ms_stay_increasing() -> None:
    """65,537 ticks at a frozen wall clock overflow once and never repeat a stamp."""
    clock = Clock("van-1", FakeWall(T0))
    prev = clock.tick()
    for _ in range(MAX_COUNTER + 1):
        cur = clock.tick()
        assert cur > prev
        prev = cur
    assert prev == Stamp(T0 + 1, 0, "van-1")


def test_observe_follows_the_receive_rule() -> None:
    """Each branch of the §4 receive rule: equal walls, local ahead, remote ahead, now ahead."""
    wall = FakeWall(T0)
    clock = Clock("dev", wall, T0, 4)
    assert clock.observe(Stamp(T0, 9, "x")) == Stamp(T0, 10, "dev")
    assert clock.observe(Stamp(T0 - 10, 50, "x")) == Stamp(T0, 11, "dev")
    assert clock.observe(Stamp(T0 + 100, 7, "x")) == Stamp(T0 + 100, 8, "dev")
    wall.now = T0 + 500
    assert clock.observe(Stamp(T0 + 200, 3, "x")) == Stamp(T0 + 500, 0, "dev")


def test_observe_counter_overflow_advances_the_wall() -> None:
    """A remote counter of 65535 at the winning wall moves the wall on by 1 ms."""
    clock = Clock("dev", FakeWall(T0))
    got = clock.observe(Stamp(T0 + 10, MAX_COUNTER, "x"))
    assert got == Stamp(T0 + 11, 0, "dev")


def test_restore_sets_state_and_never_moves_backwards() -> None:
    """restore() resumes from persisted state; an older state is ignored."""
    clock = Clock("dev", FakeWall(0))
    clock.restore(T0, 7)
    assert clock.state == (T0, 7)
    assert clock.tick() == Stamp(T0, 8, "dev")
    clock.restore(T0 - 1, 0)
    assert clock.state == (T0, 8)
    with pytest.raises(ValueError):
        clock.restore(-1, 0)
    with pytest.raises(ValueError):
        clock.restore(T0, MAX_COUNTER + 1)


def test_server_node_is_a_valid_clock_node() -> None:
    """`~server` stamps encode and parse like any other."""
    clock = Clock(SERVER_NODE, FakeWall(T0))
    stamp = clock.tick()
    assert Stamp.parse(stamp.encode()) == stamp
    with pytest.raises(ValueError):
        Clock("bad node", FakeWall(T0))


def test_skew_guard_rejects_far_future_stamps_with_a_clear_message() -> None:
    """A stamp 412 s ahead with a 300 s limit raises ClockSkewError naming the device."""
    stamp = Stamp(T0 + 412_000, 0, "van-3")
    with pytest.raises(ClockSkewError) as info:
        check_skew(stamp, 300_000, T0)
    assert str(info.value) == ("stamp from van-3 is 412 s ahead of this server's clock "
                               "(limit 300 s): fix the device's time sync")
    assert too_far_ahead(stamp, 300_000, T0)


def test_skew_guard_accepts_stamps_within_the_bound() -> None:
    """Stamps behind, at, or up to the limit ahead of the server clock pass."""
    for ahead in (-86_400_000, 0, 1, 300_000):
        check_skew(Stamp(T0 + ahead, 5, "van-3"), 300_000, T0)
        assert not too_far_ahead(Stamp(T0 + ahead, 5, "van-3"), 300_000, T0)
    with pytest.raises(ClockSkewError):
        check_skew(Stamp(T0 + 300_001, 0, "van-3"), 300_000, T0)


@pytest.mark.parametrize("text", [
    "", "0192f2a4c9b10003", "0192f2a4c9b10003:", ":van-1", "0192F2A4C9B10003:van-1",
    "0192f2a4c9b1003:van-1", "0192f2a4c9b100033:van-1", "0192f2a4c9b1000g:van-1",
    "0192f2a4c9b10003:-van", "0192f2a4c9b10003:van 1", "0192f2a4c9b10003:~other",
    " 0192f2a4c9b10003:van-1",
])
def test_bad_encodings_raise_value_error(text: str) -> None:
    """Malformed full stamps are refused with ValueError."""
    with pytest.raises(ValueError):
        Stamp.parse(text)


@pytest.mark.parametrize("tp", ["", "0192f2a4c9b1", "0192F2A4C9B10003", "x" * 16,
                                "0192f2a4c9b100030"])
def test_bad_time_parts_raise_value_error(tp: str) -> None:
    """Malformed time parts are refused by from_time_part and parse_time_part."""
    with pytest.raises(ValueError):
        Stamp.from_time_part(tp, "van-1")
    with pytest.raises(ValueError):
        parse_time_part(tp)


def test_non_string_stamp_raises_value_error() -> None:
    """parse() of a non-string is a ValueError, not a TypeError."""
    with pytest.raises(ValueError):
        Stamp.parse(12345)  # type: ignore[arg-type]
