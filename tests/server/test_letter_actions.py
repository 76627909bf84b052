"""The operator's dead-letter actions (show, retry, discard) on both stores.

Letters are made by the real engine refusing real messages; retry runs them through
the same intake checks and merge, and must keep every change's effect exactly once.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from broker.errors import DeadLetterNotFound, LetterNotRetryable
from broker.server import letter_actions
from broker.server.registry import add_device, set_enabled
from broker.server.store.base import DeadLetter, Store, dead_letter_bytes
from schemas import codec
from tests.server.helpers import (
    CATALOG,
    T0,
    FakeTime,
    changes,
    config,
    hello,
    hp,
    make_engine,
    status,
)
from waystation.hlc import SERVER_NODE, Clock


def _stock(n: int, key: str = "sku-a", inc: int = 5, scope: str = "d1") -> dict[str, object]:
    return {"n": n, "h": hp(T0 + n), "c": "inventory", "k": key, "s": scope, "b": 0,
            "op": "put", "f": {"depot": scope, "sku": key}, "i": {"stock": inc}}


def _retry(tmp: Path, store: Store, lid: int, time: FakeTime | None = None
           ) -> letter_actions.RetryResult:
    time = time or FakeTime()
    return letter_actions.retry(store, CATALOG, config(tmp).merge, Clock(SERVER_NODE, time),
                                lid, time)


def _letters(store: Store) -> list[DeadLetter]:
    with store.read() as txn:
        return txn.dead_letters(100)


def _stock_of(store: Store, key: str = "sku-a") -> object:
    with store.read() as txn:
        state = txn.get_record("inventory", key)
    return None if state is None else state["f"]["stock"][2]


def test_retry_after_enrolling_applies_once(tmp_path: Path, store: Store) -> None:
    engine, _, time = make_engine(tmp_path, {}, store=store)
    raw = changes("van-9", [_stock(1)])
    engine.handle_up("van-9", raw)
    [letter] = _letters(store)
    assert letter.code == codec.UNKNOWN_DEVICE and letter.raw == raw

    still = _retry(tmp_path, store, letter.id)
    assert not still.removed and still.code == codec.UNKNOWN_DEVICE
    assert "waystation device add van-9" in still.reason
    assert [d.id for d in _letters(store)] == [letter.id]        # kept for later

    add_device(store, "van-9", ["d1"], time())
    done = _retry(tmp_path, store, letter.id)
    assert done.removed and [c.result for c in done.changes] == ["applied"]
    assert _stock_of(store) == 5 and _letters(store) == []
    with store.read() as txn:
        [notice] = txn.notices(10)                # the running server fans it out
    assert notice.scope == "d1" and notice.rec["k"] == "sku-a"

    with pytest.raises(DeadLetterNotFound) as exc:
        _retry(tmp_path, store, letter.id)
    assert exc.value.exit_code == 1

    # The same message kept twice (or sent again by the device): never applied twice.
    again = store.transact(lambda txn: txn.add_dead_letter(
        DeadLetter(0, time(), "van-9", "up", codec.SERVER_ERROR, "crashed", raw)))
    twice = _retry(tmp_path, store, again)
    assert twice.removed and [c.result for c in twice.changes] == ["applied_before"]
    assert _stock_of(store) == 5
    # ... and the device's own resend is a duplicate as well.
    engine.tick()
    engine.handle_up("van-9", raw)
    assert _stock_of(store) == 5


def test_retry_of_refused_change_gives_the_same_answer(tmp_path: Path, store: Store) -> None:
    engine, _, _ = make_engine(tmp_path, {"van-1": ["d1"]}, store=store)
    bad = {"n": 1, "h": hp(T0 + 1), "c": "ghosts", "k": "g", "s": "d1", "b": 0, "op": "put",
           "f": {"x": 1}}
    engine.handle_up("van-1", changes("van-1", [bad, _stock(2)]))
    [letter] = _letters(store)
    result = _retry(tmp_path, store, letter.id)
    assert [(c.n, c.result, c.code) for c in result.changes] == [
        (1, "refused_before", codec.UNKNOWN_COLLECTION), (2, "applied_before", "")]
    assert result.removed and _stock_of(store) == 5


def test_retry_keeps_letter_on_transient_refusal(tmp_path: Path, store: Store) -> None:
    """A batch written under a newer schema version stays until the server runs it."""
    add_device(store, "van-1", ["d1"], T0)
    raw = changes("van-1", [_stock(1)], sv=CATALOG.version + 1)
    lid = store.transact(lambda txn: txn.add_dead_letter(
        DeadLetter(0, T0, "van-1", "up", codec.SCHEMA_VERSION, "newer schema", raw)))
    result = _retry(tmp_path, store, lid)
    assert not result.removed
    assert [(c.result, c.code) for c in result.changes] == [
        ("refused_for_now", codec.SCHEMA_VERSION)]
    assert _stock_of(store) is None and [d.id for d in _letters(store)] == [lid]


def test_retry_refuses_disabled_device(tmp_path: Path, store: Store) -> None:
    add_device(store, "van-1", ["d1"], T0)
    set_enabled(store, "van-1", False)
    lid = store.transact(lambda txn: txn.add_dead_letter(
        DeadLetter(0, T0, "van-1", "up", codec.SERVER_ERROR, "x", changes("van-1", [_stock(1)]))))
    result = _retry(tmp_path, store, lid)
    assert not result.removed and "device enable van-1" in result.reason
    assert _stock_of(store) is None


@pytest.mark.parametrize("raw", [b"{not json", b"\x78\x9c garbage", b"[]", b"{}" * 3,
                                 orjson.dumps({"type": "changes", "v": 1, "dev": "van-2",
                                               "sv": 1, "ch": [_stock(1)]})])
def test_retry_of_hostile_payload_is_still_refused(tmp_path: Path, store: Store,
                                                   raw: bytes) -> None:
    add_device(store, "van-1", ["d1"], T0)
    lid = store.transact(lambda txn: txn.add_dead_letter(
        DeadLetter(0, T0, "van-1", "up", codec.MALFORMED, "bad", raw)))
    result = _retry(tmp_path, store, lid)
    assert not result.removed and result.code in codec.ALL_CODES and result.reason
    assert [d.id for d in _letters(store)] == [lid] and _stock_of(store) is None


def test_not_retryable_letters(tmp_path: Path, store: Store) -> None:
    add_device(store, "van-1", ["d1"], T0)
    engine, _, _ = make_engine(tmp_path, store=store)
    engine.handle_status("van-1", b"{broken")
    engine.tick()   # the engine stores status letters with its next transaction
    [st] = _letters(store)
    assert st.topic == "status"
    with pytest.raises(LetterNotRetryable, match="status message"):
        _retry(tmp_path, store, st.id)
    cut = store.transact(lambda txn: txn.add_dead_letter(DeadLetter(
        0, T0, "van-1", "up", codec.TOO_LARGE, "big", b"{" + b" " * 70_000, size=70_001)))
    with pytest.raises(LetterNotRetryable, match="first 65536 of its 70001 bytes"):
        _retry(tmp_path, store, cut)
    hi = store.transact(lambda txn: txn.add_dead_letter(
        DeadLetter(0, T0, "van-1", "up", codec.SERVER_ERROR, "x", hello("van-1"))))
    with pytest.raises(LetterNotRetryable, match="hello message"):
        _retry(tmp_path, store, hi)
    assert len(_letters(store)) == 3   # nothing removed


def test_discard_one_and_all_of_a_device(store: Store) -> None:
    def add(dev: str, raw: bytes) -> int:
        return store.transact(lambda txn: txn.add_dead_letter(
            DeadLetter(0, T0, dev, "up", codec.MALFORMED, "bad", raw)))
    a1, a2, b1 = add("van-1", b"x" * 10), add("van-1", b"y" * 70_000), add("van-2", b"z")
    letter_actions.discard(store, a1)
    with pytest.raises(DeadLetterNotFound):
        letter_actions.discard(store, a1)
    assert letter_actions.discard_device(store, "van-1") == 1
    assert letter_actions.discard_device(store, "van-1") == 0
    kept = _letters(store)
    assert [d.id for d in kept] == [b1]
    with store.read() as txn:
        stats = txn.dead_letter_stats()
    # operator removals are not drops by the bounds, and the totals follow
    assert stats.count == 1 and stats.dropped == 0 and stats.truncated == 0
    assert stats.bytes == dead_letter_bytes(kept[0])
    assert letter_actions.get_letter(store, b1).device == "van-2"
    with pytest.raises(DeadLetterNotFound, match="deadletters list"):
        letter_actions.get_letter(store, a2)


def test_status_payload_helper_is_valid() -> None:
    """(guard: the status builder used above really is a status message)"""
    assert orjson.loads(status("van-1"))["type"] == "status"
