"""`waystation server backup` / `server restore`: the LMDB store copied while in use, put
back with every scope's sequence moved on, so devices resync by snapshot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.server.operations import RESTORE_SEQ_GAP
from broker.server.store import open_store
from broker.server.store.lmdb_store import LmdbStore
from tests.e2e.fleet import waystation_argv
from tests.server.helpers import (
    by_device,
    catchup,
    changes,
    make_engine,
    of_type,
    oks,
    status,
    task,
)
from waystation.cli import main
from waystation.config import ServerConfig, load_config


def run(env: dict[str, str], *argv: str,
        capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv), env=env)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_backup_while_in_use_then_restore(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "server"
    env = {"WAYSTATION_SERVER__DATA_DIR": str(data)}
    engine, store, _ = make_engine(data, {"van-1": ["r1"]})
    try:
        engine.handle_status("van-1", status("van-1"))
        engine.handle_up("van-1", changes("van-1", [task(1, "t-1"), task(2, "t-2")]))
        # The store stays open (as a running server's would) while another process, the
        # operator's command, takes the backup.
        proc = subprocess.run(waystation_argv("server", "backup", "--json",
                                              str(tmp_path / "bk")),
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["scopes"] == {"r1": 2} and doc["bytes"] > 0
        # Written after the backup: lost by the restore (said so in the help).
        engine.handle_up("van-1", changes("van-1", [task(3, "t-3")]))
    finally:
        store.close()
    capsys.readouterr()

    # Bad input: an existing destination, a restore over a live store, not a backup.
    code, _, err = run(env, "server", "backup", str(tmp_path / "bk"), capsys=capsys)
    assert code != 0 and "exists already" in err and err.count("\n") == 1
    code, _, err = run(env, "server", "restore", str(tmp_path / "bk"), capsys=capsys)
    assert code != 0 and "move that directory aside" in err
    (tmp_path / "junk").mkdir()
    code, _, err = run(env, "server", "restore", str(tmp_path / "junk"), capsys=capsys)
    assert code != 0 and "not a Waystation backup" in err

    shutil.move(data / "store", tmp_path / "old-store")
    code, out, err = run(env, "server", "restore", "--json", str(tmp_path / "bk"),
                         capsys=capsys)
    assert code == 0, err
    new_seq = 2 + RESTORE_SEQ_GAP
    assert json.loads(out)["scopes"] == {"r1": new_seq}

    engine, store, _ = make_engine(data)
    try:
        with store.read() as txn:
            assert txn.get_record("tasks", "t-1") is not None
            assert txn.get_record("tasks", "t-3") is None
            assert txn.scope_seq("r1") == new_seq
            assert txn.purge_horizon("r1") == new_seq
        # A device that had seen q 3 (applied after the backup) gets a snapshot.
        msgs = by_device(engine.handle_up("van-1", catchup("van-1", {"r1": 3})))["van-1"]
        pages = of_type(msgs, "page")
        assert pages and pages[0]["reset"] is True
        assert of_type(msgs, "checkpoint")[-1]["cp"] == {"r1": new_seq}
        # New changes continue after the jump; an old change id is still a duplicate.
        msgs = by_device(engine.handle_up("van-1", changes("van-1", [task(4, "t-4")])))
        assert [q for _n, _s, q in oks(msgs["van-1"])] == [new_seq + 1]
        msgs = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t-1")])))
        assert [q for _n, _s, q in oks(msgs["van-1"])] == [1]
    finally:
        store.close()


def test_backup_and_restore_refuse_the_postgres_store(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_SERVER__STORE__KIND": "postgres",
           "WAYSTATION_SERVER__STORE__URL": "postgresql://nobody@127.0.0.1:1/none"}
    for argv in (("server", "backup", str(tmp_path / "bk")),
                 ("server", "restore", str(tmp_path / "bk"))):
        code, _, err = run(env, *argv, capsys=capsys)
        assert code != 0 and "PostgreSQL" in err and err.count("\n") == 1
    assert not (tmp_path / "bk").exists()


def test_backup_of_no_store_is_refused_and_makes_none(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """`server backup` where there is no LMDB store (run without the server's --config,
    from another directory) fails and names the fix; it made an empty store and reported
    an empty backup as done before."""
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server")}
    code, out, err = run(env, "server", "backup", str(tmp_path / "bk"), capsys=capsys)
    assert code == 3 and out == ""
    assert f"no server store at {tmp_path / 'server' / 'store'}" in err
    assert "--config" in err and err.count("\n") == 1
    assert not (tmp_path / "bk").exists() and not (tmp_path / "server").exists()


def test_restore_in_place_moves_a_postgres_store_on(tmp_path: Path, pg_database: str,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    """After pg_restore (or any restore by other means), `--in-place` moves the store's
    sequences on so devices resync by snapshot; SRC and --in-place go one at a time."""
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_SERVER__STORE__KIND": "postgres",
           "WAYSTATION_SERVER__STORE__URL": pg_database}
    store = open_store(load_config(ServerConfig, None, env))
    engine, _, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store)
    try:
        engine.handle_up("van-1", changes("van-1", [task(1, "t-1"), task(2, "t-2")]))
    finally:
        store.close()
    capsys.readouterr()
    for argv in (("server", "restore"), ("server", "restore", "--in-place", "somewhere")):
        code, _, err = run(env, *argv, capsys=capsys)
        assert code != 0 and "--in-place" in err and err.count("\n") == 1
    code, out, err = run(env, "server", "restore", "--in-place", "--json", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["scopes"] == {"r1": 2 + RESTORE_SEQ_GAP}
    store = open_store(load_config(ServerConfig, None, env))
    engine, _, _ = make_engine(tmp_path, store=store)
    try:
        msgs = by_device(engine.handle_up("van-1", catchup("van-1", {"r1": 2})))["van-1"]
        assert of_type(msgs, "page")[0]["reset"] is True
        with store.read() as txn:
            assert txn.purge_horizon("r1") == 2 + RESTORE_SEQ_GAP
            assert txn.scope_seq("r1") == 2 + RESTORE_SEQ_GAP
    finally:
        store.close()


def test_restore_keeps_nothing_of_a_failed_copy(tmp_path: Path) -> None:
    """LmdbStore.backup refuses an existing destination before writing anything."""
    store = LmdbStore(tmp_path / "s")
    try:
        (tmp_path / "dest").mkdir()
        (tmp_path / "dest" / "keep").write_text("mine")
        with pytest.raises(Exception, match="exists already"):
            store.backup(tmp_path / "dest")
        assert [p.name for p in (tmp_path / "dest").iterdir()] == ["keep"]
    finally:
        store.close()
