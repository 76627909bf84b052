"""Transactions end to end, on both fleets (embedded broker + LMDB server store,
Mosquitto + PostgreSQL): written offline on a real agent, sent as units once the real
daemon and server agreed on `txn`, applied all or none by the server, a refused one
rolled back on the device as one."""

from __future__ import annotations

import random
import signal

import pytest

from tests.e2e.fleet import Fleet
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e

D = "depot-7"


def _outcomes(fleet: Fleet, dev: str, numbers: list[int]) -> dict[int, tuple[str, str]]:
    """change number -> ("ok", scope) or (code, reason) as the server remembered it."""
    out: dict[int, tuple[str, str]] = {}
    ns = fleet.outcome_ns(dev)
    with fleet.store.read() as txn:
        for n in numbers:
            row = txn.get_outcome(ns, n)
            assert row is not None, f"{dev}:{n} has no outcome"
            out[n] = ("ok", row.scope) if row.applied else (row.code, row.reason)
    return out


def test_transactions_apply_whole_or_roll_back_as_one(fleet: Fleet) -> None:
    fleet.add_device("van-1", [D, "route-42"])
    ag = fleet.agent("van-1")
    for key, stock in (("bin-a", 5), ("bin-b", 0)):
        ag.put("inventory", key, {"depot": D, "sku": "A"})
        if stock:
            ag.increment("inventory", key, "stock", stock)
    # Offline: an order with its lines and the stock it takes (good), then a move of
    # more stock than bin-a holds (the server's rule refuses the take from bin-a).
    with ag.transaction() as order:
        order.put("tasks", "o-1", {"route": "route-42", "status": "ordered"})
        order.put("tasks", "o-1:1", {"route": "route-42", "notes": "2 x A"})
        order.increment("inventory", "bin-a", "stock", -2)
        order.increment("inventory", "bin-b", "stock", 2)
    with ag.transaction() as move:
        move.increment("inventory", "bin-b", "stock", 9)
        move.increment("inventory", "bin-a", "stock", -9)
    good, bad = [r.n or 0 for r in order.results], [r.n or 0 for r in move.results]
    assert all(e.get("x") for e in ag.pending() if e["ch"]["n"] in good + bad)

    fleet.start_agent("van-1")
    fleet.wait_drained("van-1", timeout=60)
    wait_until(lambda: len(ag.dead_letters()) == 2, timeout=30,
               message=lambda: f"dead letters {ag.dead_letters()}")

    # The server applied the order whole and nothing of the move.
    outcomes = _outcomes(fleet, "van-1", good + bad)
    assert [outcomes[n][0] for n in good] == ["ok"] * 4
    take = bad[1]
    assert outcomes[take][0] == "rule_rejected" and "below 0" in outcomes[take][1]
    assert outcomes[bad[0]][0] == "txn_aborted"
    assert f"van-1:{bad[0]} was rejected as a whole" in outcomes[bad[0]][1]
    assert fleet.value("inventory", "bin-a", "stock") == 3
    assert fleet.value("inventory", "bin-b", "stock") == 2  # never counted twice
    assert fleet.value("tasks", "o-1", "status") == "ordered"

    # The device dropped all of the move at once: one rejected transaction, the reason.
    letters = {d.n: d for d in ag.dead_letters()}
    assert set(letters) == set(bad)
    assert {d.transaction for d in letters.values()} == {f"van-1:{bad[0]}"}
    assert letters[take].code == "rule_rejected"
    assert letters[bad[0]].code == "txn_aborted"
    a, b = ag.get("inventory", "bin-a"), ag.get("inventory", "bin-b")
    assert a is not None and b is not None
    assert (a.fields["stock"], b.fields["stock"]) == (3, 2)
    assert a.pending == 0 and b.pending == 0
    fleet.wait_converged("van-1", timeout=30)
    assert fleet.mismatches("van-1") == []
    # The daemon and the server agreed on the capability (hello caps, welcome).
    with fleet.store.read() as txn:
        row = txn.get_device("van-1")
    assert row is not None and "txn" in row.caps


def test_server_killed_mid_drain_keeps_transactions_whole(fleet: Fleet) -> None:
    """The server SIGKILLed right after committing its first group (before any ack):
    after its restart the device resends, the server answers what it committed from its
    outcomes and applies the rest, and every transaction is whole or absent — the stock
    is exactly what applying the accepted moves in order gives."""
    fleet.add_device("van-1", [D])
    ag = fleet.agent("van-1")
    bins = ["bin-a", "bin-b", "bin-c"]
    for key in bins:
        ag.put("inventory", key, {"depot": D, "sku": "A"})
        ag.increment("inventory", key, "stock", 10)
    rng = random.Random(7)
    moves: list[tuple[list[int], str, str, int]] = []
    for _ in range(40):
        src, dst = rng.sample(bins, 2)
        qty = rng.randint(1, 8)
        with ag.transaction() as tx:
            tx.increment("inventory", src, "stock", -qty)
            tx.increment("inventory", dst, "stock", qty)
        moves.append(([r.n or 0 for r in tx.results], src, dst, qty))
    fleet.stop_server()
    fleet.start_server(env={"WAYSTATION_FAILPOINT": "after_commit:1"})
    fleet.start_agent("van-1")
    assert fleet.server.wait_exit(60) == -signal.SIGKILL
    fleet.start_server()
    fleet.wait_drained("van-1", timeout=90)

    stock = dict.fromkeys(bins, 10)
    accepted = 0
    for numbers, src, dst, qty in moves:
        if stock[src] >= qty:  # the rule: a bin never below 0; moves apply in order
            stock[src] -= qty
            stock[dst] += qty
            accepted += 1
        got = _outcomes(fleet, "van-1", numbers)
        kinds = {got[n][0] == "ok" for n in numbers}
        assert len(kinds) == 1, f"transaction {numbers} applied in part: {got}"
    assert 0 < accepted < len(moves)
    for key in bins:
        assert fleet.value("inventory", key, "stock") == stock[key]
    fleet.wait_converged("van-1", timeout=30)
    assert fleet.mismatches("van-1") == []
