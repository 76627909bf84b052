"""The engine's waiting row fields (`broker.server.pending_rows`): presence is due at the
next transaction, contact times wait for the tick unless their row is written anyway."""

from __future__ import annotations

from broker.server.pending_rows import PendingRows


def test_contact_times_wait_for_the_tick_and_presence_takes_them_along() -> None:
    rows = PendingRows()
    rows.put("van-1", {"last_seen_ms": 1})
    rows.put("van-2", {"synced_ms": 2})
    assert rows and rows.take_due() == {}
    rows.put("van-2", {"online": True, "pend": 0})
    assert rows.take_due() == {"van-2": {"synced_ms": 2, "online": True, "pend": 0}}
    assert rows.take_due() == {}
    assert rows.take_all() == {"van-1": {"last_seen_ms": 1}}
    assert not rows


def test_a_row_written_by_a_group_takes_its_contact_times() -> None:
    rows = PendingRows()
    rows.put("van-1", {"last_seen_ms": 1, "synced_ms": 1})
    assert rows.contact_of("van-1") == {"last_seen_ms": 1, "synced_ms": 1}
    rows.written("van-1")
    assert rows.contact_of("van-1") == {} and not rows
    rows.put("van-1", {"online": False})  # due: not dropped by a write that predates it
    rows.written("van-1")
    assert rows.take_due() == {"van-1": {"online": False}}


def test_what_a_failed_transaction_hands_back_stays_under_newer_values() -> None:
    rows = PendingRows()
    rows.put("van-1", {"online": True, "last_seen_ms": 1})
    taken = rows.take_all()
    rows.put("van-1", {"last_seen_ms": 5})
    rows.restore(taken)
    assert rows.take_due() == {"van-1": {"online": True, "last_seen_ms": 5}}
    rows.restore({"van-2": {"synced_ms": 3}})
    assert rows.take_due() == {} and rows.take_all() == {"van-2": {"synced_ms": 3}}
