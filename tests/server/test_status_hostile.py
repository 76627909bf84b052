"""One device publishing `status` messages (PROTOCOL.md §7.10) as fast as it can, good
or bad, with absurd counts and times: the server's work per message stays in memory (no
store write per status), the log gets one presence event per device per second, bad
input gets its `reject` and a bounded number of dead letters, and `server devices`
shows nothing the device could not honestly have meant."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from broker.server import devstate
from broker.server.clockskew import CAP_MS, YEAR_MS
from broker.server.engine import Engine
from broker.server.store.base import DeviceRow, Store
from schemas.codec import MAX_SAFE_INT
from tests.server.helpers import FakeTime, by_device, changes, errors, make_engine, oks, task

DAY_MS = 86_400_000


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Engine, Store, FakeTime, list[int]]]:
    """An engine with a well-behaved device and a hostile one; the list counts the
    store's write transactions."""
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"], "bad-1": ["r1"]})
    writes: list[int] = []
    transact = store.transact

    def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        writes.append(1)
        return transact(fn, *args, **kwargs)

    store.transact = counting  # type: ignore[method-assign]
    try:
        yield engine, store, time, writes
    finally:
        store.close()


def _status(dev: str = "bad-1", **fields: Any) -> bytes:
    return orjson.dumps({"type": "status", "v": 1, "dev": dev, "on": True, **fields})


def _row(store: Store, dev: str = "bad-1") -> DeviceRow:
    with store.read() as txn:
        row = txn.get_device(dev)
    assert row is not None
    return row


def test_a_flood_of_good_statuses_writes_nothing_until_the_tick(
        env: tuple[Engine, Store, FakeTime, list[int]]) -> None:
    """20,000 valid statuses, flapping on/off with a new count each and a time far in
    the future: not one store write until the tick, which writes the latest once; no
    time shown is later than the server's clock."""
    engine, store, time, writes = env
    for i in range(20_000):
        assert engine.handle_status("bad-1", _status(on=i % 2 == 1, pend=i,
                                                     t=time() + 1000 * DAY_MS)) == []
    assert writes == []
    engine.tick()
    assert len(writes) <= 3  # the rows, the liveness row, the dead-letter trim
    row = _row(store)
    assert (row.online, row.pend, row.pend_ms, row.last_seen_ms) == (True, 19_999, time(),
                                                                     time())


def test_statuses_between_another_devices_changes_cost_one_row_per_group(
        env: tuple[Engine, Store, FakeTime, list[int]]) -> None:
    """A status flood interleaved with another device's change batches: each group still
    commits once (the flooder's row goes along), and every change is acked."""
    engine, _, _, writes = env
    for i in range(1, 51):
        for j in range(20):
            engine.handle_status("bad-1", _status(pend=j))
        out = by_device(engine.handle_many([("van-1", changes("van-1", [task(i, f"t-{i}")]))]))
        assert oks(out["van-1"]) == [[i, "r1", i]]
    assert len(writes) == 50


@pytest.mark.parametrize("t", [0, 1, 1_000_000])
def test_a_time_from_before_the_device_existed_is_dated_on_receipt(
        env: tuple[Engine, Store, FakeTime, list[int]], t: int) -> None:
    """A device whose clock reads 1970 (no real-time clock, no NTP yet): its count is
    dated when the server got it, not "5 (20,000 days ago)"."""
    engine, store, time, _ = env
    engine.handle_status("bad-1", _status(pend=5, t=t))
    engine.handle_status("bad-1", _status(on=False))  # its will: no count
    engine.tick()
    time.now += 60_000
    row = _row(store)
    assert (row.pend, row.pend_ms) == (5, time() - 60_000)
    assert devstate.pending(row, time()) == "5 (1m ago)"
    assert devstate.device_doc(row)["pending_reported"] == devstate.iso(time() - 60_000)


def test_a_time_within_the_skew_of_the_enrolment_is_the_devices(
        env: tuple[Engine, Store, FakeTime, list[int]]) -> None:
    """A clock a little behind the server's is believed (a replayed retained status is as
    old as it says)."""
    engine, store, time, _ = env
    enrolled = _row(store).created_ms
    time.now += 2 * DAY_MS
    engine.handle_status("bad-1", _status(pend=3, t=enrolled - 60_000))
    engine.tick()
    assert _row(store).pend_ms == enrolled - 60_000
    engine.handle_status("bad-1", _status(pend=4, t=enrolled + DAY_MS))
    engine.tick()
    assert _row(store).pend_ms == enrolled + DAY_MS


BAD = {
    "negative count": (_status(pend=-1), "invalid"),
    "count past 2^53": (_status(pend=10**18), "invalid"),
    "fractional count": (_status(pend=1.5), "invalid"),
    "count as text": (_status(pend="5"), "invalid"),
    "negative time": (_status(t=-5), "invalid"),
    "time past 2^53": (_status(t=10**18), "invalid"),
    "on as text": (_status(on="yes"), "invalid"),
    "over 4 KiB": (_status(agent="x" * 100, pad="x" * 5000), "too_large"),
    "not JSON": (b"\xff" * 100, "malformed"),
    "another device": (_status(dev="van-1"), "wrong_device"),
    "another type": (orjson.dumps({"type": "hello", "v": 1, "dev": "bad-1"}), "unknown_type"),
    "version 2": (orjson.dumps({"type": "status", "v": 2, "dev": "bad-1", "on": True}),
                  "unsupported_version"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_status_is_refused_clearly_and_its_flood_is_bounded(
        env: tuple[Engine, Store, FakeTime, list[int]], name: str) -> None:
    """Each bad status: a message-level reject with its §8 code and a reason starting
    `status message: `; presence and count as they were; 5,000 of them leave at most
    the first 10 dead letters (and a summary), with one store write per tick."""
    engine, store, _, writes = env
    payload, code = BAD[name]
    engine.handle_status("bad-1", _status(pend=7))
    engine.tick()
    writes.clear()
    out = by_device(engine.handle_status("bad-1", payload))
    [err] = errors(out["bad-1"])
    assert err["code"] == code and err["reason"].startswith("status message: "), err
    for _ in range(5000):
        engine.handle_status("bad-1", payload)
    assert writes == []
    engine.tick()
    assert len(writes) <= 3
    row = _row(store)
    assert (row.online, row.pend) == (True, 7)
    with store.read() as txn:
        letters = [d for d in txn.dead_letters(100_000) if d.device == "bad-1"]
    assert 1 <= len(letters) <= 11 and {d.code for d in letters} == {code}
    assert _row(store, "van-1").pend == -1  # a status naming van-1 touched nothing of it


def test_flapping_presence_logs_one_event_per_second(
        env: tuple[Engine, Store, FakeTime, list[int]]) -> None:
    """1,000 on/off flips within a second log the first change only; the tick after a
    second logs the latest state with how many changes went unlogged."""
    engine, _, time, _ = env
    engine.handle_status("bad-1", _status(on=False))
    time.now += 5000
    with capture_logs() as logs:
        for i in range(1000):
            engine.handle_status("bad-1", _status(on=i % 2 == 0, pend=i))
        engine.tick()
        first = [e for e in logs if e["event"] == "presence"]
        time.now += 1000
        engine.tick()
        time.now += 1000
        engine.tick()
    events = [e for e in logs if e["event"] == "presence"]
    assert first == [{"event": "presence", "log_level": "info", "dev": "bad-1",
                      "online": True}]
    assert events[1:] == [{"event": "presence", "log_level": "info", "dev": "bad-1",
                           "online": False, "unlogged": 999}]
    assert engine.is_online("bad-1") is False
    # A device that changes once in a while is logged each time, at once.
    with capture_logs() as logs:
        engine.handle_status("bad-1", _status(on=True))
    assert [e["online"] for e in logs if e["event"] == "presence"] == [True]


def test_a_hostile_agent_string_cannot_forge_the_devices_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hello whose `agent` holds an ANSI escape, a newline and a bidi override: `server
    devices` prints it escaped, on the device's own line (before, the raw bytes cleared
    the operator's screen and added a forged table row)."""
    from broker.server.store.lmdb_store import LmdbStore
    from waystation.cli import main

    data = tmp_path / "server"
    store = LmdbStore(data)
    engine, _, _ = make_engine(data, {"bad-1": ["r1"]}, store=store)
    agent = "\x1b[2J\x1b[31mX\x07\nvan-9  online  just now\u202e"
    engine.handle_up("bad-1", orjson.dumps({"type": "hello", "v": 1, "dev": "bad-1",
                                            "agent": agent, "sv": 1}))
    engine.flush(stopping=True)
    store.close()
    assert main(["server", "devices"], env={"WAYSTATION_SERVER__DATA_DIR": str(data)}) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    [line] = [ln for ln in out.splitlines() if "bad-1" in ln]
    assert "\\x1b[2J\\x1b[31mX\\x07\\nvan-9  online  just now\\u202e" in line
    assert not any(ln.startswith("van-9") for ln in out.splitlines())


def test_absurd_device_times_read_as_bounded_words_and_log_once(
        env: tuple[Engine, Store, FakeTime, list[int]]) -> None:
    """Live statuses saying 1970 (an RTC that lost power) or the year 287,396 (2^53 ms),
    then a flood alternating 2^53 with the right time: the row keeps at most 100 years
    either way and STATE reads "clock over a year behind (it reads 1970)" or "clock over
    a year ahead", never "20,000 days"; the flood writes nothing until the tick and logs
    nothing (a clock ahead is right again only when two statuses 10 s apart agree, so
    the flood cannot flip it); two such say it, logged once."""
    engine, store, time, writes = env
    with capture_logs() as logs:
        for i in range(2):
            time.now += 30_000
            engine.handle_status("bad-1", _status(t=i * 30_000), live=True)
        engine.tick()
    row = _row(store)
    assert -CAP_MS <= row.clk < -50 * YEAR_MS
    assert devstate.presence(row, None, time()) == (
        "online, clock over a year behind (it reads 1970)")
    assert [e["clock"] for e in logs if e["event"] == "device_clock_off"] == [
        "clock over a year behind (it reads 1970)"]
    writes.clear()
    with capture_logs() as logs:
        for i in range(10_000):
            engine.handle_status("bad-1", _status(t=MAX_SAFE_INT if i % 2 == 0 else time()),
                                 live=True)
        assert writes == []
        engine.tick()
        assert len(writes) <= 3
        time.now += 600_000
        engine.tick()
    assert not [e for e in logs if e["event"].startswith("device_clock")]
    row = _row(store)
    assert row.clk == CAP_MS and devstate.clock(row, row.clk_ms) == "clock over a year ahead"
    assert devstate.device_doc(row)["clock"]["offset_ms"] == CAP_MS
    with capture_logs() as logs:
        for _ in range(2):
            time.now += 30_000
            engine.handle_status("bad-1", _status(t=time()), live=True)
        engine.tick()
    assert [e["event"] for e in logs if e["event"].startswith("device_clock")] == [
        "device_clock_ok"]
    assert _row(store).clk == 0
