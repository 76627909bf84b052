"""Bad input (PROTOCOL.md §8, §10.1): the right code, a dead letter, nobody else harmed."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.server.engine import Engine
from broker.server.registry import set_enabled
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    T0,
    by_device,
    changes,
    errors,
    hp,
    make_engine,
    oks,
    rejections,
    task,
)
from waystation import merge
from waystation.rules import RuleContext, RuleDecision

DEVICES = {"van-1": ["r1"], "van-2": ["r1"], "van-3": ["r2"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    """An engine over a fresh store of each backend."""
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def _letters(store: Store) -> list[Any]:
    with store.read() as txn:
        return txn.dead_letters(100)


def _seq(store: Store, scope: str = "r1") -> int:
    with store.read() as txn:
        return txn.scope_seq(scope)


def _message_error(engine: Engine, store: Store, dev: str, payload: bytes
                   ) -> dict[str, Any]:
    """Send `payload` with a good batch from van-2 in the same group; return dev's err."""
    good = changes("van-2", [task(1, "ok-1", status="x")])
    out = by_device(engine.handle_many([(dev, payload), ("van-2", good)]))
    assert oks(out["van-2"]) == [[1, "r1", 1]]
    letters = _letters(store)
    assert letters and letters[0].raw == payload[: 64 * 1024] and letters[0].device == dev
    errs = errors(out.get(dev, []))
    assert len(errs) == 1 and errs[0]["code"] == letters[0].code
    return errs[0]


@pytest.mark.parametrize(("payload", "code"), [
    (b"\xff\x00not json", "malformed"),
    (b"[1, 2, 3]", "malformed"),
    (b"\x78\x9cbroken zlib", "malformed"),
    (orjson.dumps({"type": "ack", "v": 1, "ok": []}), "unknown_type"),
    (orjson.dumps({"type": "hug", "v": 1, "dev": "van-1"}), "unknown_type"),
    (orjson.dumps({"type": "changes", "v": 2, "dev": "van-1", "sv": 1, "ch": []}),
     "unsupported_version"),
    (orjson.dumps({"type": "changes", "v": 1, "dev": "van-1", "sv": 1}), "invalid"),
    (orjson.dumps({"type": "hello", "v": 1, "dev": "van-1"}), "invalid"),
    (b"x" * (256 * 1024 + 1), "too_large"),
    (zlib.compress(b'{"a":"' + b"x" * (2 * 1024 * 1024) + b'"}'), "too_large"),
    (changes("van-1", [task(i, f"k{i}", status="s") for i in range(1, 1002)]), "too_large"),
])
def test_message_level_refusals(env: tuple[Engine, Store], payload: bytes,
                                code: str) -> None:
    """Each malformed message gets its code, a dead letter, and the group goes on."""
    engine, store = env
    assert _message_error(engine, store, "van-1", payload)["code"] == code


def test_wrong_device(env: tuple[Engine, Store]) -> None:
    """A device writing as another is refused with wrong_device, answered on its own topic."""
    engine, store = env
    err = _message_error(engine, store, "van-1", changes("van-2", [task(7, "t", status="x")]))
    assert err["code"] == "wrong_device"
    with store.read() as txn:
        assert txn.get_outcome("van-2", 7) is None
        assert txn.get_record("tasks", "t") is None


def test_unregistered_and_disabled_devices(env: tuple[Engine, Store]) -> None:
    """An unknown device gets unknown_device; a disabled one has its changes held back
    (transient device_disabled, no dead letter) and applied once it is enabled again."""
    engine, store = env
    err = _message_error(engine, store, "ghost", changes("ghost", [task(1, "t", status="x")]))
    assert err["code"] == "unknown_device"
    letters_before = len(_letters(store))
    set_enabled(store, "van-1", False)
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t", status="x")])))
    held = rejections(out["van-1"])
    assert [(r["n"], r["code"], r["perm"]) for r in held] == [(1, "device_disabled", False)]
    assert "waystation device enable van-1" in held[0]["reason"]
    assert _seq(store) == 1  # nothing applied
    assert len(_letters(store)) == letters_before  # and no dead letter per message
    set_enabled(store, "van-1", True)
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t", status="x")])))
    assert [ok[0] for ok in oks(out["van-1"])] == [1]


def test_invalid_topic_device_is_kept_not_answered(env: tuple[Engine, Store]) -> None:
    """A payload from a topic level that is no device id is dead-lettered, not answered."""
    engine, store = env
    assert engine.handle_up("+bad/x", b"{}") == []
    assert _letters(store)[0].device == "+bad/x"


def _one_rejection(engine: Engine, store: Store, change: dict[str, Any],
                   dev: str = "van-1", sv: int = 1) -> dict[str, Any]:
    """Send `change` next to a good change of the same batch and another device's batch."""
    good = task(1, "good", status="fine")
    other = changes("van-2", [task(1, "other", status="fine")])
    out = by_device(engine.handle_many([(dev, changes(dev, [good, change], sv=sv)),
                                        ("van-2", other)]))
    assert oks(out["van-2"]) == [[1, "r1", 2]] or oks(out["van-2"])[0][0] == 1
    rj = rejections(out[dev])
    assert len(rj) == 1 and rj[0]["n"] == change["n"]
    if rj[0]["perm"]:
        assert _letters(store)[0].code == rj[0]["code"]
    return rj[0]


@pytest.mark.parametrize(("change", "code"), [
    (task(2, "t", "r2", status="x"), "scope_denied"),
    ({**task(2, "t"), "c": "lorries"}, "unknown_collection"),
    (task(2, "t", colour="red"), "unknown_field"),
    (task(2, "t", eta="soon"), "type_mismatch"),
    ({**task(2, "t"), "i": {"status": 1}}, "wrong_strategy"),
    (task(2, "t", "r1", route="r9"), "scope_mismatch"),
    ({"n": 2, "h": hp(T0), "c": "inventory", "k": "sku-1", "s": "r1", "op": "put",
      "f": {"depot": "r1"}, "i": {"stock": -1}}, "rule_rejected"),
    (task(2, "t", proof={"blob": "x" * (70 * 1024)}), "record_too_large"),
])
def test_change_level_refusals(env: tuple[Engine, Store], change: dict[str, Any],
                               code: str) -> None:
    """A bad change is refused for good with its code; its neighbours are applied."""
    engine, store = env
    rj = _one_rejection(engine, store, change)
    assert rj["code"] == code and rj["perm"] is True
    assert _seq(store) == 2  # the good change and van-2's; nothing for the refused one
    with store.read() as txn:
        assert txn.get_outcome("van-1", 2) is not None  # remembered


def test_refused_change_is_refused_again_identically(env: tuple[Engine, Store]) -> None:
    """Resending a permanently refused change gets the same rejection, no dead letter."""
    engine, store = env
    bad = task(1, "t", "r2", status="x")
    first = rejections(by_device(engine.handle_up("van-1", changes("van-1", [bad])))["van-1"])
    letters = len(_letters(store))
    again = rejections(by_device(engine.handle_up("van-1", changes("van-1", [bad])))["van-1"])
    assert first == again and first[0]["code"] == "scope_denied"
    assert len(_letters(store)) == letters


def test_rejection_carries_current_record(env: tuple[Engine, Store]) -> None:
    """A refused change on an existing record comes back with the record's whole state."""
    engine, _store = env
    engine.handle_up("van-1", changes("van-1", [task(1, "t", status="a")]))
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(2, "t", eta="x")])))
    rj = rejections(out["van-1"])[0]
    assert rj["code"] == "type_mismatch"
    assert rj["rec"]["f"] == {"route": "r1", "status": "a"} and not rj["rec"].get("part")


def test_scope_mismatch_does_not_reveal_a_hidden_scope(env: tuple[Engine, Store]) -> None:
    """A change that collides with a record of a scope the device may not read is
    refused `scope_mismatch` without naming that scope or sending the record."""
    engine, store = env
    out = by_device(engine.handle_up("van-3", changes("van-3", [task(1, "t", "r2")])))
    assert oks(out["van-3"]) == [[1, "r2", 1]]
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t", "r1")])))
    rj = rejections(out["van-1"])[0]
    assert rj["code"] == "scope_mismatch" and "rec" not in rj
    assert "r2" not in rj["reason"] and "'r1'" in rj["reason"]
    assert all("r2" not in letter.reason for letter in _letters(store))


def test_schema_version_is_transient_and_not_remembered(env: tuple[Engine, Store]) -> None:
    """Changes under a newer schema version are refused transiently and can apply later."""
    engine, store = env
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t", status="x")],
                                                       sv=2)))
    rj = rejections(out["van-1"])
    assert rj[0]["code"] == "schema_version" and rj[0]["perm"] is False
    assert _letters(store)[0].code == "schema_version"
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t", status="x")])))
    assert oks(out["van-1"]) == [[1, "r1", 1]]


def test_far_future_stamp_is_restamped(env: tuple[Engine, Store]) -> None:
    """A stamp beyond max_skew is replaced by the server clock's; ack lists it in rs."""
    engine, store = env
    future = T0 + 3_600_000
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "t", h=hp(future), status="x")])))
    ack = out["van-1"][0]
    assert ack["ok"] == [[1, "r1", 1]] and ack["rs"] == [1]
    stamp = ack["fx"][0]["h"]["status"]
    assert stamp.endswith(":van-1") and int(stamp[:12], 16) <= T0 + 1
    with store.read() as txn:
        rec = merge.from_json(txn.get_record("tasks", "t"))  # type: ignore[arg-type]
    assert rec.fields["status"].value.h.wall <= T0 + 1  # type: ignore[union-attr]
    letter = _letters(store)[0]
    assert letter.code == "clock_skew" and "re-stamping" in letter.reason
    # a later honest write wins over the re-stamped one
    out = by_device(engine.handle_up("van-2", changes("van-2", [
        task(1, "t", h=hp(T0 + 10), create=False, status="y")])))
    assert oks(out["van-2"]) == [[1, "r1", 2]]


def test_far_future_stamp_rejected_by_policy(tmp_path: Path) -> None:
    """With skew_policy = reject, a far-future stamp is refused with clock_skew."""
    engine, store, _ = make_engine(tmp_path, DEVICES, skew_policy="reject")
    try:
        rj = _one_rejection(engine, store, task(2, "t", h=hp(T0 + 3_600_000), status="x"))
        assert rj["code"] == "clock_skew"
    finally:
        store.close()


def test_rule_hook_rejects_and_transforms(tmp_path: Path) -> None:
    """Configured rules refuse (rule_rejected) or transform a change (fixed in ack fx)."""
    def no_lost(ctx: RuleContext) -> RuleDecision | None:
        if ctx.change.f.get("status") == "lost":
            return RuleDecision.reject("status 'lost' is not allowed: use 'failed'")
        if ctx.change.f.get("status") == "DONE":
            return RuleDecision.transform(ctx.change.model_copy(update={
                "f": {**ctx.change.f, "status": "done"}}))
        return None

    engine, store, _ = make_engine(tmp_path, DEVICES, rules=[no_lost])
    try:
        rj = _one_rejection(engine, store, task(2, "t", status="lost"))
        assert rj["code"] == "rule_rejected" and "use 'failed'" in rj["reason"]
        out = by_device(engine.handle_up("van-1", changes("van-1", [task(3, "u", status="DONE")])))
        assert out["van-1"][0]["fx"][0]["f"]["status"] == "done"
    finally:
        store.close()


def test_invalid_change_inside_valid_batch(env: tuple[Engine, Store]) -> None:
    """A malformed entry is refused on its own (invalid); a nameless one via err."""
    engine, store = env
    batch = [task(1, "a", status="x"), {"n": 2, "h": "nothex"}, {"oops": True},
             task(3, "b", status="y")]
    out = by_device(engine.handle_up("van-1", changes("van-1", batch)))["van-1"]
    assert oks(out) == [[1, "r1", 1], [3, "r1", 2]]
    rj = rejections(out)
    assert [(r["n"], r["code"], r["perm"]) for r in rj] == [(2, "invalid", True)]
    assert errors(out)[0]["code"] == "invalid"
    assert _letters(store)[0].code == "invalid"


def test_crash_in_merge_is_isolated(env: tuple[Engine, Store],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A change that crashes the merge gets a transient server_error; the rest applies."""
    engine, store = env
    real = merge.apply_change

    def exploding(record: Any, change: Any, *args: Any, **kw: Any) -> merge.Outcome:
        if change.k == "boom":
            raise RuntimeError("bug")
        return real(record, change, *args, **kw)

    monkeypatch.setattr(merge, "apply_change", exploding)
    out = by_device(engine.handle_many([
        ("van-1", changes("van-1", [task(1, "a", status="x"), task(2, "boom", status="x"),
                                    task(3, "c", status="x")])),
        ("van-2", changes("van-2", [task(1, "d", status="x")]))]))
    assert oks(out["van-1"]) == [[1, "r1", 1], [3, "r1", 2]]
    assert rejections(out["van-1"]) == [{"n": 2, "code": "server_error", "perm": False,
                                         "reason": rejections(out["van-1"])[0]["reason"]}]
    assert oks(out["van-2"]) == [[1, "r1", 3]]
    assert _letters(store)[0].code == "server_error"
    monkeypatch.setattr(merge, "apply_change", real)
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(2, "boom", status="x")])))
    assert oks(out["van-1"]) == [[2, "r1", 4]]


def test_crash_outside_merge_falls_back_per_message(env: tuple[Engine, Store],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """If a whole message blows up, it alone fails; the group's other messages apply."""
    engine, store = env
    real = engine.applier.begin

    def begin(txn: Any, *args: Any) -> Any:
        ta = real(txn, *args)
        orig = ta.apply_batch

        def apply_batch(device: Any, *a: Any, **kw: Any) -> Any:
            if device.id == "van-1":
                raise RuntimeError("bug outside the per-change guard")
            return orig(device, *a, **kw)

        ta.apply_batch = apply_batch  # type: ignore[method-assign]
        return ta

    monkeypatch.setattr(engine.applier, "begin", begin)
    out = by_device(engine.handle_many([
        ("van-1", changes("van-1", [task(1, "a", status="x")])),
        ("van-2", changes("van-2", [task(1, "b", status="x")]))]))
    assert oks(out["van-2"]) == [[1, "r1", 1]]
    assert [(r["n"], r["code"], r["perm"]) for r in rejections(out["van-1"])] == [
        (1, "server_error", False)]
    assert _letters(store)[0].code == "server_error"


def test_bad_status_is_dead_lettered(env: tuple[Engine, Store]) -> None:
    """Invalid or foreign status payloads are ignored and kept as dead letters."""
    engine, store = env
    engine.handle_status("van-1", b"garbage")
    engine.handle_status("van-1", orjson.dumps({"type": "status", "v": 1, "dev": "van-2",
                                                "on": True}))
    engine.handle_status("ghost", orjson.dumps({"type": "status", "v": 1, "dev": "ghost",
                                                "on": True}))
    assert not engine.is_online("van-1") and not engine.is_online("van-2")
    engine.tick()
    assert [d.code for d in _letters(store)] == ["unknown_device", "wrong_device", "malformed"]
    assert all(d.topic == "status" for d in _letters(store))


def test_field_errors_come_before_clock_skew(tmp_path: Path) -> None:
    """§10.1 order: a far-future change with an unknown field is refused as unknown_field."""
    engine, store, _ = make_engine(tmp_path, DEVICES, skew_policy="reject")
    try:
        rj = _one_rejection(engine, store, task(2, "t", h=hp(T0 + 3_600_000), colour="red"))
        assert rj["code"] == "unknown_field"
    finally:
        store.close()
