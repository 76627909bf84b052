"""Property tests of `broker.server.txn_units`: how a message is cut into units."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.server.txn_units import Marker, units

# A well-formed message: plain changes and transactions (each whole and adjacent).
sizes = st.lists(st.integers(0, 4), min_size=0, max_size=10)


def _message(plan: list[int]) -> tuple[list[Marker], list[list[int]]]:
    markers: list[Marker] = []
    expected: list[list[int]] = []
    n = 1
    for size in plan:
        if size == 0:
            expected.append([len(markers)])
            markers.append(None)
            n += 1
            continue
        at = list(range(len(markers), len(markers) + size))
        markers.extend([(n, size)] * size)
        expected.append(at)
        n += size
    return markers, expected


@given(plan=sizes)
def test_well_formed_messages_keep_every_change_once(plan: list[int]) -> None:
    markers, expected = _message(plan)
    got = units(markers)
    assert [u.at for u in got] == expected
    assert not any(u.problem for u in got)
    assert sorted(i for u in got for i in u.at) == list(range(len(markers)))


@given(plan=sizes.filter(lambda p: any(s >= 2 for s in p)), data=st.data())
def test_a_broken_transaction_is_refused_whole_and_others_keep_theirs(
        plan: list[int], data: st.DataObject) -> None:
    """Drop one change of a transaction, or move it away from its siblings, or change
    its count: exactly that transaction gets a problem, the rest is unaffected."""
    markers, expected = _message(plan)
    victims = [u for u in expected if len(u) >= 2]
    victim = data.draw(st.sampled_from(victims))
    tid = markers[victim[0]]
    assert tid is not None
    how = data.draw(st.sampled_from(["drop", "move", "count"]))
    broken = list(markers)
    if how == "drop":
        del broken[data.draw(st.sampled_from(victim))]
    elif how == "count":
        i = data.draw(st.sampled_from(victim))
        broken[i] = (tid[0], tid[1] + 1)
    else:
        i = victim[-1]
        broken.insert(len(broken), broken.pop(i))
        broken.insert(len(broken) - 1, None)  # a plain change between it and the others
    got = units(broken)
    bad = [u for u in got if u.problem]
    assert [u.tx for u in bad] == [tid[0]]
    assert sorted(i for u in got for i in u.at) == list(range(len(broken)))
    for u in got:
        if u.tx is not None and u.tx != tid[0]:
            assert len(u.at) == broken[u.at[0]][1]  # type: ignore[index]


def test_problems_say_what_is_wrong() -> None:
    assert units([(1, 3), (1, 3)], missing=1)[0].problem == (
        "transaction 1 says 3 changes, the message holds 2 valid ones (1 entries were "
        "invalid)")
    assert "not next to each other" in units([(1, 2), None, (1, 2)])[0].problem
    assert "different counts" in units([(1, 2), (1, 3)])[0].problem
