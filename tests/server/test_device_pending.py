"""The PENDING a `server devices` shows: the outbox count a device last reported in its
`status` (PROTOCOL.md §7.10), and, once the device is offline and cannot report any
more, how old that count is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from broker.server import devstate
from broker.server.store.base import DeviceRow, Store
from tests.server.helpers import make_engine, status

HOUR_MS = 3_600_000


def _status(dev: str, **fields: Any) -> bytes:
    return orjson.dumps({"type": "status", "v": 1, "dev": dev, "on": True, **fields})


def _row(store: Store, dev: str) -> DeviceRow:
    with store.read() as txn:
        row = txn.get_device(dev)
    assert row is not None
    return row


def test_the_count_and_its_time_outlive_the_last_will(tmp_path: Path) -> None:
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]})
    try:
        assert devstate.pending(_row(store, "van-1"), time()) == "-"  # never reported
        reported = time() - 2000
        engine.handle_status("van-1", _status("van-1", pend=5, t=reported))
        engine.tick()
        row = _row(store, "van-1")
        assert (row.online, row.pend, row.pend_ms) == (True, 5, reported)
        assert devstate.pending(row, time()) == "5"  # online: it reports when it matters
        # It drops off the network: the broker publishes its will, which has no count.
        engine.handle_status("van-1", status("van-1", on=False))
        engine.tick()
        row = _row(store, "van-1")
        assert (row.online, row.pend, row.pend_ms) == (False, 5, reported)
        assert devstate.pending(row, reported + 2 * HOUR_MS) == "5 (2h ago)"
        doc = devstate.device_doc(row)
        assert doc["pending"] == 5 and doc["pending_reported"] == devstate.iso(reported)
        # A device clock ahead of the server's: the report is not from the future.
        engine.handle_status("van-1", _status("van-1", pend=0, t=time() + HOUR_MS))
        engine.tick()
        row = _row(store, "van-1")
        assert (row.pend, row.pend_ms) == (0, time())
    finally:
        store.close()


def test_a_status_report_is_a_contact_but_never_moves_it_back(tmp_path: Path) -> None:
    """An idle online device reports its status: LAST SEEN follows it (not its last
    change, hours ago); a retained report replayed later, older than what the server
    saw since, does not move it back; a last will (no count) is not the device's."""
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]})
    try:
        assert _row(store, "van-1").last_seen_ms == 0
        reported = time() - 1000
        engine.handle_status("van-1", _status("van-1", pend=0, t=reported))
        engine.tick()
        engine.tick()
        assert _row(store, "van-1").last_seen_ms == reported
        time.now += 60_000
        engine.handle_status("van-1", _status("van-1", pend=0, t=reported - 5000))
        engine.handle_status("van-1", status("van-1", on=False))
        engine.tick()
        engine.tick()
        assert _row(store, "van-1").last_seen_ms == reported
    finally:
        store.close()


def test_how_long_changes_wait_and_dead_letters_reach_the_operator(
        tmp_path: Path, capsys: Any) -> None:
    """A device reports 3 changes waiting, the oldest written 2 h ago, and 2 dead letters
    (PROTOCOL.md §7.10 `old`, `dl`): `server devices` says since when they wait and how
    many dead letters the device holds, `server status` names the device and the command
    that lists them; its last will keeps both; an emptied outbox has no oldest."""
    from broker.server.store.lmdb_store import LmdbStore
    from waystation.cli import main

    data = tmp_path / "server"
    store = LmdbStore(data)
    engine, _, time = make_engine(data, {"van-1": ["r1"], "van-2": ["r1"]}, store=store)
    try:
        reported = time()
        engine.handle_status("van-1", _status("van-1", pend=3, old=2 * HOUR_MS, dl=2,
                                              t=reported))
        engine.handle_status("van-2", _status("van-2", pend=1, old=5000, dl=0, t=reported))
        engine.handle_status("van-1", status("van-1", on=False))  # its will: no counts
        engine.tick()
        row = _row(store, "van-1")
        assert (row.pend, row.pend_old_ms, row.dl) == (3, reported - 2 * HOUR_MS, 2)
        assert devstate.pending(row, reported + HOUR_MS) == "3 (1h ago), oldest 3h ago"
        assert devstate.dead_letters(row) == "2"
        doc = devstate.device_doc(row)
        assert doc["dead_letters"] == 2
        assert doc["pending_oldest"] == devstate.iso(reported - 2 * HOUR_MS)
        fresh = _row(store, "van-2")  # waiting 5 s: a sync under way, not worth a word
        assert devstate.pending(fresh, reported) == "1" and devstate.dead_letters(fresh) == "0"
        engine.flush(stopping=True)
    finally:
        store.close()
    env = {"WAYSTATION_SERVER__DATA_DIR": str(data)}
    assert main(["server", "devices"], env=env) == 0
    out = capsys.readouterr().out
    assert "DEAD LETTERS" in out and ", oldest " in out
    assert main(["server", "status"], env=env) == 0
    out = capsys.readouterr().out
    assert "devices holding dead letters" in out and "van-1 (2)" in out
    assert "van-2 (" not in out and "`waystation agent deadletters`" in out
    assert main(["server", "status", "--json"], env=env) == 0
    assert orjson.loads(capsys.readouterr().out)["devices"]["with_dead_letters"] == {
        "van-1": 2}


def test_an_emptied_outbox_has_no_oldest(tmp_path: Path) -> None:
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]})
    try:
        engine.handle_status("van-1", _status("van-1", pend=2, old=HOUR_MS, t=time()))
        engine.tick()
        assert _row(store, "van-1").pend_old_ms
        engine.handle_status("van-1", _status("van-1", pend=0, dl=0, t=time()))
        engine.tick()
        row = _row(store, "van-1")
        assert (row.pend, row.pend_old_ms, row.dl) == (0, 0, 0)
        assert devstate.device_doc(row)["pending_oldest"] is None
    finally:
        store.close()
