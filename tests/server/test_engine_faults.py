"""The engine's recovery branches, each made to happen with a store that fails on
chosen calls (tests/server/faulty_store.py) over a real store of each backend.

For each: what the device gets (a transient `server_error` it resends, never a silent
drop), what the operator sees (the log event), and that after the store heals nothing
is lost or applied twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from broker.server.engine import Engine
from broker.server.registry import add_device, issue_command
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.faulty_store import FaultyStore
from tests.server.helpers import (
    T0,
    by_device,
    catchup,
    changes,
    errors,
    hp,
    make_engine,
    of_type,
    oks,
    rejections,
    status,
    task,
)
from waystation import merge

DEVICES = {"van-1": ["r1"], "van-2": ["r1"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, FaultyStore]]:
    faulty = FaultyStore(store_factory())
    engine, _, _ = make_engine(tmp_path, DEVICES, store=cast(Store, faulty))
    yield engine, faulty


def bump(n: int, key: str, amount: int) -> dict[str, Any]:
    """A change adding `amount` to the `attempts` counter of task `key`."""
    return {"n": n, "h": hp(T0 + 100 + n), "c": "tasks", "k": key, "s": "r1", "b": 0,
            "op": "put", "i": {"attempts": amount}}


def attempts(store: FaultyStore, key: str) -> Any:
    with store.inner.read() as txn:
        raw = txn.get_record("tasks", key)
    assert raw is not None, key
    return merge.from_json(raw).value("attempts")


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_a_group_reads_no_registry_before_its_transaction(
        env: tuple[Engine, FaultyStore]) -> None:
    """Online, a group costs its one transaction and no read: the registry generation is
    checked inside the transaction, so a failing read path does not touch the group."""
    engine, store = env
    store.fail_reads(None)
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "a")])))
    assert store.injected == 0
    assert [ok[0] for ok in oks(out["van-1"])] == [1]


def test_registry_reload_failing_inside_a_group_asks_the_device_to_resend(
        env: tuple[Engine, FaultyStore]) -> None:
    """The registry moved (the CLI changed a device) and reloading it fails: the group's
    changes get a transient `server_error`, the operator sees `store_failed`, and the
    resend after the store heals is applied once, under the reloaded registry."""
    engine, store = env
    issue_command(store.inner, "van-2", "ping", T0)  # bumps the registry generation
    store.fail_reads(None)
    with capture_logs() as logs:
        out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "a")])))
    assert store.injected >= 1
    rj = rejections(out["van-1"])
    assert [r["n"] for r in rj] == [1] and rj[0]["code"] == "server_error" and not rj[0]["perm"]
    assert [e["log_level"] for e in events(logs, "store_failed")] == ["error"]
    with store.inner.read() as txn:
        assert txn.get_record("tasks", "a") is None
    store.heal()
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "a")])))
    assert [ok[0] for ok in oks(out["van-1"])] == [1]
    assert engine.counters["applied"] == 1


def test_group_commit_failing_with_a_store_error_asks_devices_to_resend(
        env: tuple[Engine, FaultyStore]) -> None:
    """The group's transaction fails (store error): each change gets a transient
    `server_error` (not permanent: the device keeps it), nothing is written; the resend
    after the store heals is applied once."""
    engine, store = env
    engine.handle_up("van-1", changes("van-1", [task(1, "a")]))
    group = [("van-1", changes("van-1", [bump(2, "a", 3)])),
             ("van-2", changes("van-2", [task(1, "b"), bump(2, "b", 4)]))]
    store.fail_transacts({1})
    with capture_logs() as logs:
        out = by_device(engine.handle_many(group))
    assert events(logs, "store_failed")
    for dev, numbers in (("van-1", [2]), ("van-2", [1, 2])):
        rj = rejections(out[dev])
        assert [r["n"] for r in rj] == numbers
        assert {r["code"] for r in rj} == {"server_error"} and not any(r["perm"] for r in rj)
        assert not oks(out[dev])
    assert attempts(store, "a") is None
    with store.inner.read() as txn:
        assert txn.get_record("tasks", "b") is None
    store.heal()
    out = by_device(engine.handle_many(group))          # the devices resend
    assert [ok[0] for ok in oks(out["van-1"])] == [2]
    assert [ok[0] for ok in oks(out["van-2"])] == [1, 2]
    out = by_device(engine.handle_many(group))          # an ack lost: resent once more
    assert attempts(store, "a") == 3 and attempts(store, "b") == 4   # not doubled
    assert engine.counters["duplicates"] == 3


def test_group_failing_otherwise_applies_each_message_on_its_own(
        env: tuple[Engine, FaultyStore]) -> None:
    """A non-store exception in the group's transaction: every message is applied in a
    transaction of its own, so one bad message cannot hold the others back."""
    engine, store = env
    group = [("van-1", changes("van-1", [task(1, "a"), bump(2, "a", 2)])),
             ("van-2", changes("van-2", [task(1, "b")]))]
    store.fail_transacts({1}, RuntimeError("injected: bug in a rule"))
    with capture_logs() as logs:
        out = by_device(engine.handle_many(group))
    assert events(logs, "group_failed") and not events(logs, "message_failed")
    assert [ok[0] for ok in oks(out["van-1"])] == [1, 2]
    assert [ok[0] for ok in oks(out["van-2"])] == [1]
    assert attempts(store, "a") == 2
    assert engine.counters["applied"] == 3


def test_message_failing_alone_is_dead_lettered_and_resent(
        env: tuple[Engine, FaultyStore]) -> None:
    """The group fails, then one message fails on its own too: it is kept as a dead
    letter (code server_error) for the operator, its device gets a transient reject, the
    other message is applied; the resend is applied once."""
    engine, store = env
    group = [("van-1", changes("van-1", [task(1, "a"), bump(2, "a", 5)])),
             ("van-2", changes("van-2", [task(1, "b")]))]
    store.fail_transacts({1, 2}, RuntimeError("injected"))   # the group, then van-1 alone
    with capture_logs() as logs:
        out = by_device(engine.handle_many(group))
    assert [e["dev"] for e in events(logs, "message_failed")] == ["van-1"]
    assert not events(logs, "dead_letter_failed")
    assert {r["code"] for r in rejections(out["van-1"])} == {"server_error"}
    assert [ok[0] for ok in oks(out["van-2"])] == [1]
    with store.inner.read() as txn:
        letters = txn.dead_letters(10)
    assert [(d.device, d.code) for d in letters] == [("van-1", "server_error")]
    assert letters[0].raw == group[0][1]   # the payload as sent, for the operator
    store.heal()
    out = by_device(engine.handle_many(group[:1]))
    assert [ok[0] for ok in oks(out["van-1"])] == [1, 2]
    assert attempts(store, "a") == 5


def test_dead_letter_write_failing_is_logged_and_the_device_still_resends(
        env: tuple[Engine, FaultyStore]) -> None:
    """Even the dead letter cannot be written: the operator sees `dead_letter_failed`,
    the device still gets its transient reject, and its resend is applied once."""
    engine, store = env
    group = [("van-1", changes("van-1", [task(1, "a"), bump(2, "a", 7)]))]
    store.fail_transacts({1, 2, 3}, RuntimeError("injected"))
    with capture_logs() as logs:
        out = by_device(engine.handle_many(group))
    assert [e["dev"] for e in events(logs, "dead_letter_failed")] == ["van-1"]
    assert [r["n"] for r in rejections(out["van-1"])] == [1, 2]
    with store.inner.read() as txn:
        assert txn.dead_letters(10) == []
        assert txn.get_record("tasks", "a") is None
    store.heal()
    out = by_device(engine.handle_many(group))
    assert [ok[0] for ok in oks(out["van-1"])] == [1, 2]
    assert attempts(store, "a") == 7


def test_presence_kept_through_a_failed_commit(env: tuple[Engine, FaultyStore]) -> None:
    """A presence change waiting to be written survives a failed group commit and
    reaches the store at the next tick once the store works again."""
    engine, store = env
    engine.tick()   # the periodic trim and purge are done: this tick's only write is the commit
    engine.handle_status("van-1", status("van-1", True))
    store.fail_transacts(None)
    with capture_logs() as logs:
        engine.tick()
    assert events(logs, "store_failed") and not events(logs, "tick_failed")
    with store.inner.read() as txn:
        row = txn.get_device("van-1")
    assert row is not None and not row.online
    store.heal()
    engine.tick()
    with store.inner.read() as txn:
        row = txn.get_device("van-1")
    assert row is not None and row.online


def test_tick_failing_is_logged_never_raised_and_retried(
        env: tuple[Engine, FaultyStore]) -> None:
    """tick() whose store reads fail logs `tick_failed` (with the exception) and returns
    nothing instead of raising into the server's loop; the next tick does the work."""
    engine, store = env
    engine.handle_status("van-1", status("van-1", True))
    engine.tick()
    cmd = issue_command(store.inner, "van-1", "resync", T0)
    store.fail_reads(None)
    with capture_logs() as logs:
        assert engine.tick() == []
    failed = events(logs, "tick_failed")
    assert [e["log_level"] for e in failed] == ["error"] and failed[0].get("exc_info")
    store.heal()
    out = by_device(engine.tick())
    assert [m["id"] for m in of_type(out["van-1"], "command")] == [cmd.id]


def test_batch_over_the_configured_limit_is_refused_whole(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """`merge.max_batch_changes` below the protocol's 1000: a bigger batch is refused as
    too_large, saying to split it, and nothing of it is applied."""
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory(),
                                   max_batch_changes=2)
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "a"), task(2, "b"), task(3, "c")])))
    [err] = errors(out["van-1"])
    assert err["code"] == "too_large" and "at most 2; split the batch" in err["reason"]
    with store.read() as txn:
        assert all(txn.get_record("tasks", k) is None for k in "abc")
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "a"), task(2, "b")])))
    assert [ok[0] for ok in oks(out["van-1"])] == [1, 2]


# ------------------------------------------------------------------ catch-up answers


def test_catchup_failing_for_one_device_answers_the_others(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """Reading one device's scope fails while answering a group's catch-ups: that device
    gets a transient server_error ("ask again later"), the other its page; asking again
    once the store heals gets the missing page."""
    faulty = FaultyStore(store_factory())
    engine, _, _ = make_engine(tmp_path, {"van-1": ["r1"], "van-2": ["r2"]},
                               store=cast(Store, faulty))
    engine.handle_up("van-1", changes("van-1", [task(1, "a")]))
    engine.handle_up("van-2", changes("van-2", [task(1, "b", "r2")]))
    faulty.txn_faults["index_range"] = \
        lambda scope, *_: RuntimeError("injected") if scope == "r2" else None
    group = [("van-1", catchup("van-1", {"r1": 0})), ("van-2", catchup("van-2", {"r2": 0}))]
    with capture_logs() as logs:
        out = by_device(engine.handle_many(group))
    assert [e["dev"] for e in events(logs, "catchup_failed")] == ["van-2"]
    [err] = errors(out["van-2"])
    assert err["code"] == "server_error" and "ask again later" in err["reason"]
    assert [r["k"] for m in of_type(out["van-1"], "page") for r in m["recs"]] == ["a"]
    faulty.txn_faults.clear()
    out = by_device(engine.handle_many(group[1:]))
    assert [r["k"] for m in of_type(out["van-2"], "page") for r in m["recs"]] == ["b"]


def test_catchup_store_failing_answers_every_device_with_server_error(
        env: tuple[Engine, FaultyStore]) -> None:
    """The snapshot for the catch-ups cannot be opened: every asking device gets a
    transient server_error; the operator sees `catchup_store_failed`."""
    engine, store = env
    engine.handle_up("van-1", changes("van-1", [task(1, "a")]))
    group = [("van-1", catchup("van-1", {"r1": 0})), ("van-2", catchup("van-2", {"r1": 0}))]
    engine.tick()
    store.fail_reads({1})   # the catch-up snapshot (a group reads no registry first)
    with capture_logs() as logs:
        out = by_device(engine.handle_many(group))
    assert events(logs, "catchup_store_failed")
    for dev in ("van-1", "van-2"):
        [err] = errors(out[dev])
        assert err["code"] == "server_error" and "ask again later" in err["reason"]
        assert not of_type(out[dev], "page")


def test_status_of_a_new_device_while_the_registry_cannot_be_read_is_kept(
        env: tuple[Engine, FaultyStore]) -> None:
    """A device enrolled since the last refresh sends its (retained, sent once) status
    while the store cannot be read: the status is kept, not dead-lettered as from an
    unknown device, and counts at the next tick once the store works."""
    engine, store = env
    engine.tick()
    add_device(store.inner, "van-9", ["r1"], T0)
    store.fail_reads(None)
    with capture_logs() as logs:
        assert engine.handle_status("van-9", status("van-9", True)) == []
    assert [e["dev"] for e in events(logs, "registry_refresh_failed")] == ["van-9"]
    assert not engine.is_online("van-9")
    store.heal()
    engine.tick()
    assert engine.is_online("van-9")
    engine.tick()
    with store.inner.read() as txn:
        row = txn.get_device("van-9")
        assert row is not None and row.online
        assert not [d for d in txn.dead_letters(10) if d.code == "unknown_device"]
