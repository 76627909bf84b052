"""Merge-server liveness (`broker.server.liveness`): the row the engine writes about its
server (started, seen every 5 s at most, stopped cleanly) and how it is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from broker.errors import StoreError
from broker.server import liveness
from broker.server.engine import Engine
from broker.server.store.base import ServerRow
from broker.server.store.lmdb_store import LmdbStore
from tests.server.faulty_store import FaultyStore
from tests.server.helpers import CATALOG, T0, FakeTime, config
from waystation import __version__
from waystation.processes import this_process


def _rows(store: FaultyStore) -> list[ServerRow]:
    with store.inner.read() as txn:
        return txn.servers()


def test_tick_records_the_server_every_5_s_and_a_clean_stop_says_so(tmp_path: Path) -> None:
    """A starting engine writes the row; ticks within 5 s write nothing at all (no
    transaction); the one 5 s on rewrites seen_ms; flush(stopping=True) writes
    stopped_ms; a restart under the same id starts a new row at once."""
    time = FakeTime()
    store = FaultyStore(LmdbStore(tmp_path))
    engine = Engine(store, CATALOG, config(tmp_path), time)
    me = this_process()  # which process it is: `server status` on this host checks it
    assert me and _rows(store) == [ServerRow("server-1", "main", __version__, T0, T0, proc=me)]
    engine.tick()
    before = store.transacts
    for _ in range(4):
        time.now += 1_000
        engine.tick()
    assert store.transacts == before and _rows(store)[0].seen_ms == T0
    time.now += 1_000
    engine.tick()
    assert store.transacts == before + 1 and _rows(store)[0].seen_ms == T0 + 5_000
    time.now += 500
    engine.flush(stopping=True)
    assert _rows(store) == [ServerRow("server-1", "main", __version__, T0, T0 + 5_500,
                                      stopped_ms=T0 + 5_500, proc=me)]
    time.now += 60_000
    Engine(store, CATALOG, config(tmp_path), time)
    (row,) = _rows(store)
    assert (row.started_ms, row.seen_ms, row.stopped_ms) == (T0 + 65_500, T0 + 65_500, 0)
    store.close()


def test_a_failed_liveness_write_is_retried_at_the_next_tick(tmp_path: Path) -> None:
    """A store that fails the liveness write leaves the row due: the next tick writes
    it, even a tick whose other work failed."""
    time = FakeTime()
    store = FaultyStore(LmdbStore(tmp_path))
    store.fail_transacts(None, StoreError("injected: disk gone"))
    engine = Engine(store, CATALOG, config(tmp_path), time)
    time.now += 1_000
    engine.tick()
    assert _rows(store) == []
    store.heal()
    store.fail_reads({1})  # the tick's registry refresh fails: tick_failed
    time.now += 1_000
    engine.tick()
    assert [r.seen_ms for r in _rows(store)] == [T0 + 2_000]
    store.close()


def test_states_and_the_warning() -> None:
    """running / stopped / gone by the threshold; the warning says what to do."""
    row = ServerRow("s1", "main", "1.0", T0, T0 + 10_000)
    stale = liveness.STALE_AFTER_S * 1000
    assert liveness.state(row, T0 + 10_000 + stale, stale) == "running"
    assert liveness.state(row, T0 + 10_001 + stale, stale) == "gone"
    stopped = ServerRow("s1", "main", "1.0", T0, T0 + 10_000, stopped_ms=T0 + 10_000)
    assert liveness.state(stopped, T0 + 10_000, stale) == "stopped"
    assert liveness.presence_as_of([row, ServerRow("s2", "main", "1.0", T0, T0 + 3)]) == (
        T0 + 10_000)
    assert "not seen for 3 min" in liveness.describe(row, T0 + 190_000, stale)
    warning = liveness.no_server_warning([row], 30)
    assert "NO MERGE SERVER IS RUNNING" in warning and "waystation server run" in warning
    # PENDING is a device's last report: as stale as its presence (nobody records more)
    assert "presence (online/offline) and PENDING counts are as of" in warning


def test_the_warning_on_a_store_no_server_ever_used_says_so_first() -> None:
    """A new install's first `server status` (no server has run on the store yet) is told
    that, before the advice for a server older than this release; that advice came first
    and alone, sending a newcomer looking for an old server to restart."""
    warning = liveness.no_server_warning([], 30)
    assert "none has run on it yet (a new store: start one)" in warning
    assert warning.index("none has run on it yet") < warning.index("before the upgrade")
    assert "waystation server run" in warning


def test_a_server_cut_off_from_its_broker_says_so() -> None:
    """The daemon tells the heartbeat about its broker link before each tick: a change
    makes the row due at once and the row carries since when the link is down; the
    operator's line, JSON and warning say the server merges nothing; presence is as of
    when the link went down."""
    beat = liveness.Heartbeat("s1", "main", "1.0", T0)
    row = beat.due(T0)
    assert row is not None and row.broker_down_ms == 0
    beat.written(row)
    beat.broker(True, T0 + 1_000)
    assert beat.due(T0 + 1_000) is None  # nothing changed: every 5 s
    beat.broker(False, T0 + 2_000)
    cut = beat.due(T0 + 2_000)  # at once, not 5 s after the last write
    assert cut is not None and cut.broker_down_ms == T0 + 2_000
    beat.written(cut)
    beat.broker(False, T0 + 3_000)  # still down: since the first time it was seen down
    later = beat.due(T0 + 7_000)
    assert later is not None and later.broker_down_ms == T0 + 2_000

    stale = liveness.STALE_AFTER_S * 1000
    now = T0 + 7_000 + 120_000 - 5_000
    line = liveness.describe(dataclasses.replace(later, seen_ms=now), now, stale)
    assert "running" in line and "NOT CONNECTED TO THE BROKER since" in line
    assert "2 min" in line and "[mqtt]" in line
    doc = liveness.server_doc(dataclasses.replace(later, seen_ms=now), now, stale)
    assert doc["state"] == "running" and doc["broker_connected"] is False
    assert doc["broker_down_since"] is not None
    rows = [dataclasses.replace(later, seen_ms=now)]
    assert liveness.any_running(rows, now, stale) and not liveness.any_serving(rows, now, stale)
    assert liveness.presence_as_of(rows) == T0 + 2_000
    warning = liveness.cut_off_warning(rows)
    assert "NO MERGE SERVER IS CONNECTED TO THE BROKER" in warning
    assert "presence (online/offline) and PENDING counts are as of" in warning

    beat.broker(True, T0 + 8_000)
    back = beat.due(T0 + 8_000)
    assert back is not None and back.broker_down_ms == 0
    assert liveness.any_serving([back], T0 + 8_000, stale)
    assert liveness.server_doc(back, T0 + 8_000, stale)["broker_connected"] is True


def test_the_start_hint_names_the_config_it_was_given() -> None:
    row = ServerRow("s1", "main", "1.0", T0, T0 + 10_000)
    warning = liveness.no_server_warning([row], 30, "/etc/waystation/server.toml")
    assert "`waystation server run --config /etc/waystation/server.toml`" in warning
    assert "systemctl start waystation-server" in warning


def test_a_second_servers_line_names_its_own_config_and_service() -> None:
    """`server status` read with server-1's config: server-2 crashed (or not seen) is
    started from its own config and service (the guide's `server-2.toml`,
    `waystation-server-2`); naming server-1's (`systemctl start waystation-server`,
    `server run --config server.toml`) would start or inspect the wrong server."""
    stale = liveness.STALE_AFTER_S * 1000
    conf = "/etc/waystation/server.toml"
    one = ServerRow("server-1", "main", __version__, T0, T0, proc="boot/4026531836/7/99")
    two = dataclasses.replace(one, id="server-2")
    now = T0 + 5_000
    crashed = liveness.describe(two, now, stale, {"server-2"}, conf, "server-1")
    assert "has ended without stopping cleanly" in crashed
    assert "server_id = 'server-2'" in crashed and "its systemd service" in crashed
    assert "waystation-server`" not in crashed and f"--config {conf}`" not in crashed
    own = liveness.describe(one, now, stale, {"server-1"}, conf, "server-1")
    assert "`systemctl start waystation-server`" in own and f"--config {conf}`" in own
    gone = liveness.describe(two, T0 + 190_000, stale, (), conf, "server-1")
    assert "`systemctl status` of its service" in gone
    assert "`systemctl status waystation-server`" not in gone
