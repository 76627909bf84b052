"""A device whose clock is far off, named to the operator: the server measures it from
the device's live `status` (PROTOCOL.md §7.10, `broker.server.clockskew`), keeps it in
the device's row, logs it once, and `server devices` / `server status` say it with what
to do. A clock far behind is the case that mattered: its changes were accepted and lost
last-writer-wins without anyone told."""

from __future__ import annotations

import json
import time as systime
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from broker.server import devstate
from broker.server.daemon import MergeServer
from broker.server.engine import Engine
from broker.server.registry import add_device
from broker.server.store import open_store
from broker.server.store.base import DeviceRow, Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import CATALOG, FakeTime, make_engine
from waystation.cli import main
from waystation.config import ServerConfig, load_config

HOUR_MS = 3_600_000
EVERY_MS = 30_000
"""The agent's status interval."""


def _status(dev: str, t: int, on: bool = True, **fields: Any) -> bytes:
    return orjson.dumps({"type": "status", "v": 1, "dev": dev, "on": on, "t": t, **fields})


def _row(store: Store, dev: str) -> DeviceRow:
    with store.read() as txn:
        row = txn.get_device(dev)
    assert row is not None
    return row


def _wall() -> FakeTime:
    return FakeTime(systime.time_ns() // 1_000_000)


def _live(engine: Engine, time: FakeTime, dev: str, offset: int, n: int = 1) -> None:
    """`n` live statuses of `dev`, 30 s apart, its clock `offset` ms from the server's."""
    for _ in range(n):
        time.now += EVERY_MS
        engine.handle_status(dev, _status(dev, time() + offset), live=True,
                             received_ms=time())


def test_a_clock_behind_is_named_from_the_second_status_and_logged_once(
        tmp_path: Path) -> None:
    """An RTC 3 h behind: its first live status proves nothing (it may have waited on
    the way), the next one 30 s later does; STATE says "clock 3 h behind", the log says
    it once however many statuses follow; NTP back, it is "online" and logged once."""
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]}, time=_wall())
    try:
        with capture_logs() as logs:
            _live(engine, time, "van-1", -3 * HOUR_MS)
            engine.tick()
            assert _row(store, "van-1").clk_ms == 0
            _live(engine, time, "van-1", -3 * HOUR_MS)
            engine.tick()
            row = _row(store, "van-1")
            assert abs(row.clk + 3 * HOUR_MS) <= 1 and row.clk_ms == time()
            assert devstate.presence(row, None, time()) == "online, clock 3 h behind"
            # read two days later, the device gone quiet: how old the measure is
            assert devstate.clock(row, time() + 2 * 86_400_000) == (
                "clock 3 h behind as of 2d ago")
            assert devstate.device_doc(row)["clock"] == {
                "offset_ms": row.clk, "off": True, "measured": devstate.iso(time()),
                "note": "clock 3 h behind"}
            _live(engine, time, "van-1", -3 * HOUR_MS, n=200)
            engine.tick()
            _live(engine, time, "van-1", 0)
            engine.tick()
        row = _row(store, "van-1")
        assert (row.clk, row.clk_ms) == (0, time())
        assert devstate.presence(row, None, time()) == "online"
        assert devstate.device_doc(row)["clock"]["off"] is False
        assert [(e["event"], e.get("clock")) for e in logs
                if e["event"].startswith("device_clock")] == [
            ("device_clock_off", "clock 3 h behind"), ("device_clock_ok", None)]
    finally:
        store.close()


def test_a_clock_ahead_is_named_at_its_first_status(tmp_path: Path) -> None:
    """Ahead is proven by one status (transit only makes `t` look older)."""
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]}, time=_wall())
    try:
        _live(engine, time, "van-1", 2 * HOUR_MS)
        engine.tick()
        assert devstate.clock(_row(store, "van-1"), time()) == "clock 2 h ahead"
    finally:
        store.close()


def test_retained_replays_and_a_late_backlog_tell_nothing(tmp_path: Path) -> None:
    """A retained status replayed to a (re)starting server is as old as it says; a
    broker's backlog of statuses queued while the server was away arrives live but in a
    burst: neither makes a good clock look behind. Then a live status says it is fine."""
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]}, time=_wall())
    try:
        with capture_logs() as logs:
            for i in range(5):  # replays at five restarts, each 30 s apart
                time.now += EVERY_MS
                engine.handle_status("van-1", _status("van-1", time() - 2 * HOUR_MS + i),
                                     live=False, received_ms=time())
                engine.handle_status("van-1", _status("van-1", time() - 2 * HOUR_MS + i))
            engine.tick()
            assert _row(store, "van-1").clk_ms == 0
            time.now += 4 * HOUR_MS  # the server was down 4 h; the device went on
            for i in range(480):  # ... its statuses, queued by the broker, at once
                engine.handle_status("van-1", _status("van-1", time() - (480 - i) * EVERY_MS),
                                     live=True, received_ms=time() + i // 100)
            engine.tick()
            assert _row(store, "van-1").clk == 0  # its last ones were within the limit
            _live(engine, time, "van-1", 1_500)
            engine.tick()
        assert (_row(store, "van-1").clk, _row(store, "van-1").clk_ms) == (0, time())
        assert not [e for e in logs if e["event"] == "device_clock_off"]
    finally:
        store.close()


def test_the_time_of_arrival_counts_not_when_the_worker_got_to_it(tmp_path: Path) -> None:
    """Statuses that waited 10 min in a busy server's intake are compared with when
    they arrived: a good clock is not named behind because the server was slow."""
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]}, time=_wall())
    try:
        for _ in range(3):
            time.now += EVERY_MS
            arrived = time() - 600_000
            engine.handle_status("van-1", _status("van-1", arrived), live=True,
                                 received_ms=arrived)
        engine.tick()
        assert (_row(store, "van-1").clk, _row(store, "van-1").clk_ms) == (0, arrived)
    finally:
        store.close()


def test_the_daemon_passes_the_retain_flag_and_the_arrival_time(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """Through the daemon's intake: a status the broker sends as retained is not a
    measure; live ones are, at the time they arrived."""
    store = store_factory()
    now = systime.time_ns() // 1_000_000
    add_device(store, "van-1", ["r1"], now)
    cfg = ServerConfig.model_validate({"data_dir": str(tmp_path), "mqtt": {"password": "x"}})
    server = MergeServer(cfg, CATALOG, env={}, store=store)
    topic = f"{server.prefix}/van-1/status"

    def arrive(retained: bool) -> None:
        """Two statuses 5 h behind, published 30 s apart, as if they arrived so."""
        for back in (2 * EVERY_MS, EVERY_MS):
            payload = _status("van-1", now - 5 * HOUR_MS - back)
            if retained:
                server._on_retained(topic, payload)
            else:
                server._on_message(topic, payload)
            group = server.intake.take(1.0, max_items=10, max_bytes=1 << 20)
            assert group is not None and group[0].at >= now
            assert group[0].retained is retained
            object.__setattr__(group[0], "at", group[0].at - back)
            server._process(group)
        server.engine.flush()

    arrive(retained=True)
    assert _row(store, "van-1").clk_ms == 0
    arrive(retained=False)
    row = _row(store, "van-1")
    assert devstate.clock(row, row.clk_ms) == "clock 5 h behind"


@pytest.fixture
def env(server_cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment, on an LMDB store and on a fresh PostgreSQL database."""
    return server_cli_env


def test_server_devices_and_status_name_the_clocks_off(
        env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """On a real store, through the CLI: `server devices` says the clock in STATE and
    `clock` in --json; `server status` names the devices off, furthest first, with what
    to do, and `devices.clock_off` in --json. A device with a right clock is not named."""
    data = Path(env["WAYSTATION_SERVER__DATA_DIR"])
    store = open_store(load_config(ServerConfig, None, env))
    engine, _, time = make_engine(data, {"van-1": ["r1"], "van-2": ["r1"], "van-3": ["r1"]},
                                  store=store, time=_wall())
    try:
        _live(engine, time, "van-1", -3 * HOUR_MS, n=2)
        _live(engine, time, "van-2", 0, n=2)
        _live(engine, time, "van-3", -(time() - 946_684_800_000), n=2)  # RTC at 2000
        engine.tick()
    finally:
        store.close()
    capsys.readouterr()
    assert main(["server", "devices"], env=env) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "online, clock 3 h behind" in lines["van-1"]
    assert "clock" not in lines["van-2"]
    assert "online, clock over a year behind (it reads 2000)" in lines["van-3"]
    assert main(["server", "devices", "--json"], env=env) == 0
    docs = {d["id"]: d for d in json.loads(capsys.readouterr().out)}
    assert docs["van-1"]["clock"]["note"] == "clock 3 h behind"
    assert abs(docs["van-1"]["clock"]["offset_ms"] + 3 * HOUR_MS) <= 1
    assert docs["van-2"]["clock"] == {"offset_ms": 0, "off": False, "note": None,
                                      "measured": docs["van-2"]["clock"]["measured"]}
    assert main(["server", "status"], env=env) == 0
    out = capsys.readouterr().out
    assert ("devices whose clock is off (behind: their changes lose last-writer-wins to "
            "writes older in reality; ahead: re-stamped or refused): van-3 over a year behind "
            "(it reads 2000), van-1 3 h behind; fix the device's time sync (NTP)") in out
    assert main(["server", "status", "--json"], env=env) == 0
    off = json.loads(capsys.readouterr().out)["devices"]["clock_off"]
    assert sorted(off) == ["van-1", "van-3"] and off["van-1"]["note"] == "clock 3 h behind"
