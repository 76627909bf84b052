"""Bandwidth caps and the metered day's budget."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.policy import DailyBudget, TokenBucket


@given(st.floats(10, 10_000), st.floats(0, 5), st.lists(
    st.tuples(st.floats(0, 2), st.integers(1, 5000)), min_size=1, max_size=60))
def test_bucket_bounds_the_rate(rate: float, burst_s: float,
                                sends: list[tuple[float, int]]) -> None:
    """Bytes sent while the bucket allowed it stay within burst + rate x time + one
    batch, however the sends are spaced."""
    burst = rate * burst_s
    bucket = TokenBucket.full(rate, burst, 0.0)
    now = 0.0
    total = 0
    biggest = 0
    for gap, size in sends:
        now += gap
        if bucket.wait_s(now) == 0:
            bucket = bucket.take(size, now)
            total += size
            biggest = max(biggest, size)
        else:
            assert bucket.wait_s(now) > 0
            # after the announced wait, sending is allowed
            assert bucket.wait_s(now + bucket.wait_s(now) + 1e-6) == 0
    assert total <= burst + rate * now + biggest + 1e-6


@given(st.integers(1, 10**6), st.lists(st.tuples(st.sampled_from(["d1", "d2", "d3"]),
                                                st.integers(0, 10**5)), max_size=40))
def test_budget_counts_per_day(limit: int, sends: list[tuple[str, int]]) -> None:
    """The budget counts the bytes of the current day only; a new day starts at 0."""
    budget = DailyBudget(limit)
    days = sorted(sends, key=lambda s: s[0])
    expected: dict[str, int] = {}
    for day, size in days:
        budget = budget.add(size, day)
        expected[day] = expected.get(day, 0) + size
        assert budget.spent(day) == expected[day]
        assert budget.left(day) == max(0, limit - expected[day])
    assert DailyBudget(None).left("d1") is None
