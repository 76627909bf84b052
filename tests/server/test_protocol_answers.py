"""The answers PROTOCOL.md gives a device author who would otherwise have to guess.

Each test drives the engine with raw wire bytes, as a device written in another language
would, and pins one point the text states normatively (issue 8 §6): catch-up requests
stand alone, duplicate change numbers, changes before their record's put, the clock
counter's overflow, number and depth codes, `max_length`, gaps in `n`, `changes` before
`hello`, the order of a catch-up and a later batch, bad and missing `status` messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.server.engine import Engine
from broker.server.registry import issue_command
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    T0,
    by_device,
    changes,
    errors,
    hello,
    hp,
    make_engine,
    of_type,
    oks,
    rejections,
    status,
    task,
)
from waystation import merge

DEVICES = {"van-1": ["r1", "r2"], "van-2": ["r1"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    """An engine over a fresh store of each backend."""
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def _send(engine: Engine, dev: str, msg: dict[str, Any] | bytes) -> list[dict[str, Any]]:
    payload = msg if isinstance(msg, bytes) else orjson.dumps(msg)
    return by_device(engine.handle_up(dev, payload)).get(dev, [])


def _ask(engine: Engine, dev: str, cp: dict[str, int], req: str = "c1",
         **extra: Any) -> list[dict[str, Any]]:
    """A `catchup` with exactly the members given (no `lim` unless passed)."""
    return _send(engine, dev, {"type": "catchup", "v": 1, "dev": dev, "req": req, "cp": cp,
                               **extra})


def _fill(engine: Engine, dev: str, scope: str, count: int, start: int = 1) -> None:
    batch = [task(n, f"{scope}-{n}", scope, status="s") for n in range(start, start + count)]
    assert len(oks(_send(engine, dev, changes(dev, batch)))) == count


def _record(store: Store, key: str) -> merge.RecordState:
    with store.read() as txn:
        raw = txn.get_record("tasks", key)
    assert raw is not None
    return merge.from_json(raw)


def _seq(store: Store, scope: str) -> int:
    with store.read() as txn:
        return txn.scope_seq(scope)


# ------------------------------------------------------------------------ catch-up


def test_lim_does_not_carry_over_to_a_continuation(env: tuple[Engine, Store]) -> None:
    """Each catchup stands alone: a continuation without `lim` gets the default page size."""
    engine, _ = env
    _fill(engine, "van-1", "r1", 5)
    first = _ask(engine, "van-1", {"r1": 0}, lim=2)
    [page] = of_type(first, "page")
    assert (len(page["recs"]), page["more"], page["to"]) == (2, True, 2)
    assert of_type(first, "checkpoint") == []
    rest = _ask(engine, "van-1", {"r1": page["to"]})
    [page] = of_type(rest, "page")
    assert (len(page["recs"]), page["more"], page["from"], page["to"]) == (3, False, 2, 5)
    assert [m["cp"] for m in of_type(rest, "checkpoint")] == [{"r1": 5}]


def test_checkpoint_answers_only_a_request_that_completes(env: tuple[Engine, Store]) -> None:
    """No checkpoint while any scope of the request says `more`; each continuation that
    completes gets one listing exactly the scopes it asked for."""
    engine, _ = env
    _fill(engine, "van-1", "r1", 3)
    _fill(engine, "van-1", "r2", 3, start=4)
    first = _ask(engine, "van-1", {"r1": 0, "r2": 0}, lim=2)
    assert [(p["s"], p["more"]) for p in of_type(first, "page")] == [("r1", True),
                                                                    ("r2", True)]
    assert of_type(first, "checkpoint") == []
    one = _ask(engine, "van-1", {"r1": 2}, lim=2)
    assert [m["cp"] for m in of_type(one, "checkpoint")] == [{"r1": 3}]
    two = _ask(engine, "van-1", {"r2": 2}, lim=2)
    assert [m["cp"] for m in of_type(two, "checkpoint")] == [{"r2": 3}]
    # A scope with nothing to send, asked beside one that needs more pages, gets
    # neither a page nor a checkpoint in that answer: the device asks for it again.
    mixed = _ask(engine, "van-1", {"r1": 3, "r2": 0}, lim=2)
    assert [(m["type"], m.get("s")) for m in mixed] == [("page", "r2")]
    again = _ask(engine, "van-1", {"r1": 3, "r2": 2}, lim=2)
    assert [m["cp"] for m in of_type(again, "checkpoint")] == [{"r1": 3, "r2": 3}]


def test_catchup_before_a_batch_in_one_round_sees_the_batch(
        env: tuple[Engine, Store]) -> None:
    """A catch-up may be answered from a state later than the one it was sent at: the
    batch that followed it is acked first and its record is already in the page."""
    engine, _ = env
    ask = orjson.dumps({"type": "catchup", "v": 1, "dev": "van-1", "req": "c1",
                        "cp": {"r1": 0}})
    batch = changes("van-1", [task(1, "t-1", status="out")])
    out = by_device(engine.handle_many([("van-1", ask), ("van-1", batch)]))["van-1"]
    assert [m["type"] for m in out] == ["ack", "page", "checkpoint"]
    assert oks(out) == [[1, "r1", 1]]
    [rec] = out[1]["recs"]
    assert (rec["k"], rec["q"], rec["f"]["status"]) == ("t-1", 1, "out")
    assert out[2]["cp"] == {"r1": 1}


# ------------------------------------------------------------------------ change numbers


def test_duplicate_n_in_one_batch_is_a_repeat_of_the_first(env: tuple[Engine, Store]) -> None:
    """A change number twice in one batch: two `ok` entries with one q, applied once, and
    the repeat's fx is the whole record at that q; a differing copy is refused
    (id_reused) and not applied."""
    engine, store = env
    out = _send(engine, "van-1", changes("van-1", [task(1, "t-1", status="a"),
                                                   task(1, "t-1", status="a"),
                                                   task(1, "t-1", status="b")]))
    assert oks(out) == [[1, "r1", 1], [1, "r1", 1]]
    assert [(r["n"], r["code"]) for r in rejections(out)] == [(1, "id_reused")]
    [ack] = of_type(out, "ack")
    assert [(f["q"], f.get("part", False), f["f"]["status"]) for f in ack["fx"]] == [
        (1, False, "a")]
    assert _seq(store, "r1") == 1


def test_duplicate_n_takes_the_outcome_of_its_first_occurrence(
        env: tuple[Engine, Store]) -> None:
    """An invalid entry and a valid one with the same n: the first occurrence decides
    (batch order) and the other content is `id_reused` (§7.4, §10.2), whichever comes
    first; nothing is applied for the invalid entry, which is never acked as a repeat of
    the valid change. The same invalid entry sent again is refused again as it was."""
    engine, store = env
    bad = {"n": 1, "h": "not-a-stamp", "c": "tasks", "k": "t-1", "s": "r1", "b": 0,
           "op": "put", "f": {"status": "a"}}
    out = _send(engine, "van-1", changes("van-1", [bad, task(1, "t-1", status="a")]))
    assert oks(out) == []
    assert [(r["n"], r["code"]) for r in rejections(out)] == [(1, "invalid"), (1, "id_reused")]
    assert _seq(store, "r1") == 0
    again = rejections(_send(engine, "van-1", changes("van-1", [bad])))
    assert [(r["n"], r["code"]) for r in again] == [(1, "invalid")]
    assert again[0]["reason"] == rejections(out)[0]["reason"]
    later = _send(engine, "van-1", changes("van-1", [task(1, "t-1", status="a")]))
    assert oks(later) == [] and [r["code"] for r in rejections(later)] == ["id_reused"]
    # A valid change first: the invalid entry after it is not acked as its repeat.
    out = _send(engine, "van-1", changes("van-1", [task(2, "t-2", status="a"),
                                                   {**bad, "n": 2, "k": "t-2"}]))
    assert oks(out) == [[2, "r1", 1]]
    assert [(r["n"], r["code"]) for r in rejections(out)] == [(2, "id_reused")]
    assert _seq(store, "r1") == 1


def test_change_numbers_need_not_be_gapless(env: tuple[Engine, Store]) -> None:
    """The server does not check that n is gapless or increasing: 7, 3, 100 are each
    applied once, in arrival order."""
    engine, store = env
    for n, q in ((7, 1), (3, 2), (100, 3)):
        out = _send(engine, "van-1", changes("van-1", [task(n, "t-1", status=f"s{n}")]))
        assert oks(out) == [[n, "r1", q]]
    assert _seq(store, "r1") == 3
    assert oks(_send(engine, "van-1", changes("van-1", [task(3, "t-1", status="s3")]))) == [
        [3, "r1", 2]]
    other = _send(engine, "van-1", changes("van-1", [task(3, "t-1", status="x")]))
    assert [r["code"] for r in rejections(other)] == ["id_reused"]


def test_increment_before_its_records_put(env: tuple[Engine, Store]) -> None:
    """A counter increment arriving before the put that creates its record creates it;
    its ack carries a whole state (no `part`) with the total; the put is acked later."""
    engine, store = env
    inc = {"n": 2, "h": hp(T0 + 2), "c": "tasks", "k": "t-1", "s": "r1", "b": 0,
           "op": "put", "i": {"attempts": 1}}
    first = _send(engine, "van-1", changes("van-1", [inc]))
    [ack] = of_type(first, "ack")
    assert ack["ok"] == [[2, "r1", 1]]
    assert ack["fx"] == [{"c": "tasks", "k": "t-1", "s": "r1", "q": 1, "f": {"attempts": 1}}]
    put = _send(engine, "van-1", changes("van-1", [task(1, "t-1", customer="Bakery")]))
    [ack] = of_type(put, "ack")
    assert ack["ok"] == [[1, "r1", 2]] and "fx" not in ack
    record = _record(store, "t-1")
    assert (record.value("attempts"), record.value("customer"), record.s) == (1, "Bakery", "r1")


# ------------------------------------------------------------------------ clock stamps


def test_counter_overflow_moves_to_the_next_millisecond(env: tuple[Engine, Store]) -> None:
    """(w, ffff) is followed by (w + 1, 0000): the later stamp wins by stamp order."""
    engine, store = env
    w = T0 + 10
    _send(engine, "van-1", changes("van-1", [task(1, "t-1", h=hp(w, 0xFFFF), status="a")]))
    out = _send(engine, "van-2", changes("van-2", [
        task(1, "t-1", h=hp(w + 1, 0), create=False, status="b")]))
    assert oks(out) == [[1, "r1", 2]]
    assert _record(store, "t-1").value("status") == "b"
    late = _send(engine, "van-2", changes("van-2", [
        task(2, "t-1", h=hp(w, 0xFFFE), create=False, status="c")]))
    assert late[0]["fx"][0]["f"]["status"] == "b"  # an older stamp loses


@pytest.mark.parametrize("h", ["0192f2a4c9b110000", "0192f2a4c9b1000", "0192F2A4C9B10000",
                               "0192f2a4c9b1fff0x"])
def test_a_time_part_not_16_lowercase_hex_digits_is_invalid(env: tuple[Engine, Store],
                                                           h: str) -> None:
    """A counter cannot pass ffff inside a stamp: 17 digits, 15, uppercase are `invalid`."""
    engine, _ = env
    out = _send(engine, "van-1", changes("van-1", [task(1, "t-1", h=h, status="a")]))
    assert [(r["n"], r["code"], r["perm"]) for r in rejections(out)] == [(1, "invalid", True)]


# ------------------------------------------------------------------------ numbers, depth


_HELLO = b'{"type":"hello","v":1,"dev":"van-1","agent":"x","sv":1,"z":false,"extra":'


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
def test_nan_infinity_and_overflowing_numbers_are_malformed(env: tuple[Engine, Store],
                                                            literal: bytes) -> None:
    """NaN / Infinity are not JSON, and a literal beyond a double cannot be finite:
    the message is `malformed`, wherever the number is."""
    engine, _ = env
    out = _send(engine, "van-1", _HELLO + literal + b"}")
    assert [e["code"] for e in errors(out)] == ["malformed"]


def test_integers_beyond_53_bits_are_invalid(env: tuple[Engine, Store]) -> None:
    """An integer literal with |x| >= 2^53 is `invalid`: in an unknown member it spoils
    the message; in one change it refuses that change alone."""
    engine, _ = env
    out = _send(engine, "van-1", _HELLO + str(2**53).encode() + b"}")
    assert [e["code"] for e in errors(out)] == ["invalid"]
    batch = changes("van-1", [task(1, "t-1", status="a"), task(2, "t-2", eta=2**53)])
    out = _send(engine, "van-1", batch)
    assert oks(out) == [[1, "r1", 1]]
    assert [(r["n"], r["code"]) for r in rejections(out)] == [(2, "invalid")]


def test_a_whole_float_is_not_an_integer(env: tuple[Engine, Store]) -> None:
    """`n: 1.0` or `b: 1e0` make the change `invalid`; 5.0 in an int field is
    `type_mismatch`; the batch's other changes apply."""
    engine, _ = env
    batch = changes("van-1", [task(1, "t-1", status="a"), {**task(4, "t-4"), "b": 1.0},
                              task(2, "t-2", eta=5.0), task(3, "t-3", eta=5)])
    raw = batch.replace(b'"n":1,', b'"n":1.0,', 1)
    assert raw != batch
    out = _send(engine, "van-1", raw)
    assert oks(out) == [[3, "r1", 1]]
    assert sorted((r["n"], r["code"]) for r in rejections(out)) == [(2, "type_mismatch"),
                                                                    (4, "invalid")]
    assert [e["code"] for e in errors(out)] == ["invalid"]  # n = 1.0 is no change number


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return value


def test_values_nested_deeper_than_32_levels_are_invalid(env: tuple[Engine, Store]) -> None:
    """A field value of 32 levels is stored; 33 levels refuse that change as `invalid`."""
    engine, _ = env
    batch = changes("van-1", [task(1, "t-1", proof=_nested(32)), task(2, "t-2", proof=_nested(33))])
    out = _send(engine, "van-1", batch)
    assert oks(out) == [[1, "r1", 1]]
    assert [(r["n"], r["code"]) for r in rejections(out)] == [(2, "invalid")]


@pytest.mark.parametrize("levels", [41, 200, 1000])
def test_messages_nested_deeper_than_40_levels_are_invalid(env: tuple[Engine, Store],
                                                           levels: int) -> None:
    """Depth over the message limit is `invalid`, never `malformed`."""
    engine, _ = env
    deep = b"[" * (levels - 1) + b"1" + b"]" * (levels - 1)  # `extra` is at level 2
    out = _send(engine, "van-1", _HELLO + deep + b"}")
    assert [e["code"] for e in errors(out)] == ["invalid"]


# ------------------------------------------------------------------------ max_length


def test_max_length_counts_characters_not_bytes(env: tuple[Engine, Store]) -> None:
    """`status` has max_length 32: 32 characters pass however many UTF-8 bytes (or UTF-16
    units) they take; 33 characters are `type_mismatch`."""
    engine, _ = env
    fits = ["é" * 32, "\U0001f69a" * 32, "x" * 32]
    out = _send(engine, "van-1", changes("van-1", [task(n, f"t-{n}", status=value)
                                                   for n, value in enumerate(fits, 1)]))
    assert [ok[0] for ok in oks(out)] == [1, 2, 3]
    out = _send(engine, "van-1", changes("van-1", [task(9, "t-9", status="é" * 33)]))
    assert [(r["n"], r["code"]) for r in rejections(out)] == [(9, "type_mismatch")]


def test_set_max_length_limits_each_member_not_the_count(env: tuple[Engine, Store]) -> None:
    """`labels` has max_length 32: each member may have 32 characters, and a set may hold
    more than 32 members; a 33-character member is `type_mismatch`."""
    engine, store = env
    members = [f"{i:02d}" + "\U0001f4e6" * 30 for i in range(40)]
    add = {"n": 1, "h": hp(T0 + 1), "c": "tasks", "k": "t-1", "s": "r1", "b": 0, "op": "put",
           "f": {"route": "r1"}, "a": {"labels": members}}
    assert oks(_send(engine, "van-1", changes("van-1", [add]))) == [[1, "r1", 1]]
    assert len(_record(store, "t-1").value("labels")) == 40
    long = {**add, "n": 2, "a": {"labels": ["y" * 33]}}
    out = _send(engine, "van-1", changes("van-1", [long]))
    assert [(r["n"], r["code"]) for r in rejections(out)] == [(2, "type_mismatch")]


# ------------------------------------------------------------------------ hello, status


def test_changes_and_catchup_before_any_hello_are_served(env: tuple[Engine, Store]) -> None:
    """hello is not a precondition: a device that never sent one is acked and answered,
    uncompressed (no hello said `z`); after `hello` with `z`, large answers compress."""
    engine, _ = env
    batch = changes("van-1", [task(n, f"t-{n}", notes="x" * 200) for n in range(1, 41)])
    out = by_device(engine.handle_up("van-1", batch))["van-1"]
    assert [ok[0] for ok in oks(out)] == list(range(1, 41))
    answer = engine.handle_up("van-1", orjson.dumps(
        {"type": "catchup", "v": 1, "dev": "van-1", "req": "c1", "cp": {"r1": 0}}))
    assert all(payload[:1] == b"{" for _, payload in answer)
    assert engine.handle_up("van-1", hello("van-1", z=True)) == []
    answer = engine.handle_up("van-1", orjson.dumps(
        {"type": "catchup", "v": 1, "dev": "van-1", "req": "c2", "cp": {"r1": 0}}))
    assert answer[0][1][:1] == b"\x78"


def test_a_device_that_never_publishes_status_gets_no_deltas(env: tuple[Engine, Store]) -> None:
    """Deltas and pushed commands go only to devices whose status says `on: true`; without
    one a device learns of others' changes by catch-up and of commands from `hello`."""
    engine, store = env
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t-1", status="a")])))
    assert set(out) == {"van-1"}
    cmd = issue_command(store, "van-2", "ping", T0)
    assert "van-2" not in by_device(engine.tick())
    assert [m["id"] for m in _send(engine, "van-2", hello("van-2"))] == [cmd.id]
    pages = _ask(engine, "van-2", {"r1": 0})
    assert [r["k"] for p in of_type(pages, "page") for r in p["recs"]] == ["t-1"]
    engine.handle_status("van-2", status("van-2"))
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(2, "t-2", status="b")])))
    assert [m["type"] for m in out["van-2"]] == ["delta"]
    engine.handle_status("van-2", status("van-2", on=False))
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(3, "t-3", status="c")])))
    assert "van-2" not in out


@pytest.mark.parametrize(("payload", "code"), [
    (b"garbage", "malformed"),
    (b'{"type":"status","v":1,"dev":"van-1"}', "invalid"),
    (b'{"type":"status","v":1,"dev":"van-1","on":"yes"}', "invalid"),
    (b'{"type":"status","v":1,"dev":"van-2","on":true}', "wrong_device"),
    (b'{"type":"hello","v":1,"dev":"van-1","agent":"x","sv":1}', "unknown_type"),
    (b'{"type":"status","v":2,"dev":"van-1","on":true}', "unsupported_version"),
    (b'{"type":"status","v":1,"dev":"van-1","on":true,"pad":"' + b"x" * 5000 + b'"}',
     "too_large"),
])
def test_a_bad_status_is_answered_and_changes_nothing(env: tuple[Engine, Store],
                                                      payload: bytes, code: str) -> None:
    """A status the server cannot read leaves presence as it was, becomes a dead letter,
    and the device gets a message-level `reject` naming the problem."""
    engine, store = env
    engine.handle_status("van-1", status("van-1"))
    out = by_device(engine.handle_status("van-1", payload))
    assert [(m["type"], m["rj"], m["err"]["code"]) for m in out["van-1"]] == [
        ("reject", [], code)]
    assert out["van-1"][0]["err"]["reason"].startswith("status message: ")
    assert engine.is_online("van-1")
    engine.tick()
    with store.read() as txn:
        assert [(d.device, d.topic, d.code) for d in txn.dead_letters(10)] == [
            ("van-1", "status", code)]


def test_a_bad_status_of_an_unregistered_device_is_not_answered(
        env: tuple[Engine, Store]) -> None:
    """Retained statuses of removed devices replay to every server: kept, not answered."""
    engine, _ = env
    assert engine.handle_status("ghost", b"garbage") == []
    assert engine.handle_status("ghost", status("ghost")) == []
    assert not engine.is_online("ghost")
