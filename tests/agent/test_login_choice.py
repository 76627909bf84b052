"""`agent.login_choice.LoginChoice`: which login the next attempt uses (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.login_choice import LoginChoice

CANDIDATES = st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 99)),
                                st.text(min_size=1, max_size=4)), min_size=1, max_size=5)


@given(CANDIDATES, st.lists(st.booleans(), max_size=20))
def test_refusals_move_round_and_acceptance_goes_back_to_the_first(
        candidates: list[tuple[int | None, str]], outcomes: list[bool]) -> None:
    """After k refusals since the last acceptance the k-th candidate (mod the count) is
    tried; refused/accepted report the candidate that was tried."""
    choice: LoginChoice[int, str] = LoginChoice()
    since = 0
    for accepted in outcomes:
        held, value = candidates[since % len(candidates)]
        assert choice.pick(candidates) == value and choice.trying == held
        if accepted:
            assert choice.accepted() == held
            since = 0
        else:
            assert choice.refused() == held
            since += 1
    assert choice.pick(candidates) == candidates[since % len(candidates)][1]


@given(CANDIDATES, st.integers(1, 10))
def test_restart_and_no_candidates(candidates: list[tuple[int | None, str]],
                                   refusals: int) -> None:
    """New candidates start from the first; with none there is nothing to try."""
    choice: LoginChoice[int, str] = LoginChoice()
    for _ in range(refusals):
        choice.pick(candidates)
        choice.refused()
    choice.restart()
    assert choice.pick(candidates) == candidates[0][1]
    assert choice.pick([]) is None and choice.trying is None
