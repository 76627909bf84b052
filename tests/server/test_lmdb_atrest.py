"""Encryption at rest of the LMDB server store: on from the start (store.encryption_key_file),
switched on and off in place (`server encrypt`/`decrypt`, resumable after kill -9), the
key changed in O(1) (`server rekey`); wrong and hostile keys refused clearly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.keyring import DEK_FILE, KeyEncryptionKey
from broker.errors import StoreError, StoreKeyError
from broker.server.store import lmdb_atrest, open_store
from broker.server.store.base import ConflictRow, DeadLetter, Notice
from broker.server.store.lmdb_store import LmdbStore
from tests.server.helpers import changes, make_engine, status, task
from waystation.atrest.rewrite import KILL_POINT_ENV
from waystation.cli import main
from waystation.config import ServerConfig, load_config
from waystation.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SECRET = "secret-customer-0815"


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "server.key"
    path.write_bytes(os.urandom(32))
    return path


def _kek(path: Path) -> KeyEncryptionKey:
    return KeyEncryptionKey.from_file(path)


def _fill(data: Path, kek: KeyEncryptionKey | None = None, bulk: int = 150) -> None:
    """Records through the engine, plus conflicts, dead letters and notices."""
    engine, store, _ = make_engine(data, {"van-1": ["r1"]},
                                   store=LmdbStore(data, kek=kek))
    try:
        engine.handle_status("van-1", status("van-1"))
        engine.handle_up("van-1", changes("van-1", [task(i + 1, f"t-{i}", notes=f"{SECRET} {i}")
                                                    for i in range(20)]))

        def more(txn: Any) -> None:
            for i in range(bulk):
                txn.put_record("tasks", f"b-{i:04d}", {"s": "r1", "q": i, "notes": SECRET})
                txn.add_conflict(ConflictRow(0, 1, "tasks", f"b-{i:04d}", "r1", "notes",
                                             {"lost": f"{SECRET} {i}"}, open=i % 2 == 0))
                txn.add_dead_letter(DeadLetter(0, 2, "van-1", "ws/up/van-1", "invalid",
                                               "bad", f"{SECRET} raw {i}".encode()))
                txn.add_notice(Notice(0, "r1", i, {"c": "tasks", "k": f"b-{i}",
                                                   "f": {"notes": SECRET}}))
        store.transact(more)
    finally:
        store.close()


def _dump(data: Path, kek: KeyEncryptionKey | None) -> dict[str, Any]:
    with LmdbStore(data, kek=kek) as store, store.read() as txn:
        return {"records": txn.records_after(None, None, 10_000),
                "conflicts": txn.conflicts(open_only=False, limit=10_000),
                "open": txn.conflicts(open_only=True, limit=10_000),
                "letters": txn.dead_letters(10_000), "stats": txn.dead_letter_stats(),
                "notices": txn.notices(10_000), "devices": txn.devices(),
                "seqs": txn.scope_seqs(), "counts": txn.counts(),
                "index": txn.index_range("r1", 0, 10_000)}


def _visible(data: Path) -> bool:
    return SECRET.encode() in (data / "store" / "data.mdb").read_bytes()


def test_encrypted_from_the_start(tmp_path: Path, key: Path) -> None:
    """A new store with a key seals every value; it opens only with that key."""
    data = tmp_path / "server"
    _fill(data, _kek(key))
    assert not _visible(data)
    before = _dump(data, _kek(key))
    assert len(before["records"]) == 170 and len(before["letters"]) == 150
    with pytest.raises(StoreKeyError, match=r"store\.encryption_key_file"):
        LmdbStore(data)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    with pytest.raises(StoreKeyError, match=re.escape(str(wrong))):
        LmdbStore(data, kek=_kek(wrong))


def test_encrypt_rekey_decrypt_in_place(tmp_path: Path, key: Path) -> None:
    """A plain store encrypted in place keeps every row, the engine works on it, rekey
    rewrites only the data key file, decrypt goes back."""
    data = tmp_path / "server"
    _fill(data)
    before = _dump(data, None)
    assert _visible(data)
    out = lmdb_atrest.encrypt(data, _kek(key), batch=64)
    assert out.changed and out.values == 170 + 3 * 150
    assert not _visible(data)
    assert _dump(data, _kek(key)) == before
    with pytest.raises(StoreKeyError, match="is encrypted"):
        LmdbStore(data)
    assert not lmdb_atrest.encrypt(data, _kek(key)).changed
    engine, store, _ = make_engine(data, store=LmdbStore(data, kek=_kek(key)))
    try:
        engine.handle_up("van-1", changes("van-1", [task(21, "t-new", notes="after")]))
        with store.read() as txn:
            assert txn.get_record("tasks", "t-new") is not None
    finally:
        store.close()
    mdb = data / "store" / "data.mdb"
    content = mdb.read_bytes()
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    lmdb_atrest.rekey(data, _kek(key), _kek(new))
    assert mdb.read_bytes() == content  # O(1): the store is not rewritten
    with pytest.raises(StoreKeyError):
        LmdbStore(data, kek=_kek(key))
    after_rekey = _dump(data, _kek(new))
    back = lmdb_atrest.decrypt(data, _kek(new), batch=100)
    assert back.after == "plain" and not (data / "store" / DEK_FILE).exists()
    assert _dump(data, None) == after_rekey
    with pytest.raises(StoreKeyError, match="server encrypt"):
        LmdbStore(data, kek=_kek(new))  # a plain store with a key configured


def test_hostile_keys(tmp_path: Path, key: Path) -> None:
    """Truncated or altered data key file, a too-short key file: clear errors, exit 2."""
    data = tmp_path / "server"
    _fill(data, _kek(key), bulk=3)
    dek = data / "store" / DEK_FILE
    good = dek.read_bytes()
    dek.write_bytes(good[:10])
    with pytest.raises(StoreKeyError, match="not a Waystation data key file") as exc:
        LmdbStore(data, kek=_kek(key))
    assert exc.value.exit_code == 2
    dek.write_bytes(good[:-2] + b"\0\0")
    with pytest.raises(StoreKeyError, match=re.escape(str(dek))):
        LmdbStore(data, kek=_kek(key))
    dek.unlink()
    with pytest.raises(StoreKeyError, match="missing"):
        LmdbStore(data, kek=_kek(key))
    dek.write_bytes(good)
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    env = {"WAYSTATION_SERVER__DATA_DIR": str(data),
           "WAYSTATION_SERVER__STORE__ENCRYPTION_KEY_FILE": str(short)}
    assert main(["server", "status"], env=env) == 2
    assert main(["server", "rekey", "--key-file", str(key), "--new-key-file", str(short)],
                env=env) == 2
    assert _dump(data, _kek(key))["counts"]["records"] == 23


def test_postgres_refuses_the_key_setting(tmp_path: Path) -> None:
    """store.encryption_key_file with PostgreSQL is a configuration error saying what to
    do instead."""
    env = {"WAYSTATION_SERVER__STORE__KIND": "postgres",
           "WAYSTATION_SERVER__STORE__URL": "postgresql://db/ws",
           "WAYSTATION_SERVER__STORE__ENCRYPTION_KEY_FILE": str(tmp_path / "k")}
    with pytest.raises(ConfigError, match="encrypt the database's volume"):
        load_config(ServerConfig, None, env)


def test_refused_while_the_server_has_the_store_open(tmp_path: Path, key: Path) -> None:
    """A process holding the store (a running server) makes encrypt refuse, naming it."""
    data = tmp_path / "server"
    _fill(data, bulk=2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from broker.server.store.lmdb_store import "
         "LmdbStore; s = LmdbStore(sys.argv[1]); "  # open and idle, as a quiet server
         "print('ready', flush=True); sys.stdin.read()", str(data)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match=str(holder.pid)):
            lmdb_atrest.encrypt(data, _kek(key))
    finally:
        holder.communicate("")
    assert lmdb_atrest.encrypt(data, _kek(key)).changed


def _cli(data: Path, *argv: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WAYSTATION_SERVER__DATA_DIR": str(data), "PYTHONPATH": str(ROOT)}
    env.pop(KILL_POINT_ENV, None)
    if kill_at:
        env[KILL_POINT_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "waystation", "server", *argv], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["dek", "marker", "batch:2", "renamed", "finished"])
def test_kill_9_during_encrypt_then_rerun(tmp_path: Path, key: Path, point: str) -> None:
    """kill -9 of `server encrypt` at each step: the store refuses to open until the same
    command ran again, and then holds every row."""
    data = tmp_path / "server"
    _fill(data)
    before = _dump(data, None)
    killed = _cli(data, "encrypt", "--key-file", str(key), "--batch", "100", kill_at=point)
    assert killed.returncode == -9, killed.stderr
    with pytest.raises(StoreError, match="server encrypt"):
        LmdbStore(data, kek=_kek(key))
    done = _cli(data, "encrypt", "--key-file", str(key), "--batch", "100", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["after"] == "envelope"
    assert _dump(data, _kek(key)) == before
    assert not _visible(data)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["marker", "batch:3", "finished"])
def test_kill_9_during_decrypt_then_rerun(tmp_path: Path, key: Path, point: str) -> None:
    """The same for `server decrypt`."""
    data = tmp_path / "server"
    _fill(data, _kek(key))
    before = _dump(data, _kek(key))
    killed = _cli(data, "decrypt", "--key-file", str(key), "--batch", "100", kill_at=point)
    assert killed.returncode == -9, killed.stderr
    done = _cli(data, "decrypt", "--key-file", str(key))
    assert done.returncode == 0, done.stderr
    assert _dump(data, None) == before


def test_backup_and_restore_of_an_encrypted_store(tmp_path: Path, key: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The backup carries the wrapped data key (not the key file); restore with the key
    configured gives the same rows."""
    data = tmp_path / "server"
    _fill(data, _kek(key), bulk=5)
    env = {"WAYSTATION_SERVER__DATA_DIR": str(data),
           "WAYSTATION_SERVER__STORE__ENCRYPTION_KEY_FILE": str(key)}
    assert main(["server", "backup", str(tmp_path / "bk"), "--json"], env=env) == 0
    assert (tmp_path / "bk" / "store" / DEK_FILE).exists()
    assert SECRET.encode() not in (tmp_path / "bk" / "store" / "data.mdb").read_bytes()
    other = tmp_path / "restored"
    env2 = {**env, "WAYSTATION_SERVER__DATA_DIR": str(other)}
    assert main(["server", "restore", str(tmp_path / "bk"), "--json"], env=env2) == 0
    config = load_config(ServerConfig, None, env2)
    store = open_store(config, env2)
    try:
        with store.read() as txn:
            assert txn.counts()["records"] == 25
    finally:
        store.close()
    capsys.readouterr()


@pytest.mark.slow
def test_kill_9_during_rekey_before_the_rename(tmp_path: Path, key: Path) -> None:
    """kill -9 of `server rekey` after the new wrap was written to its temp file but
    before the rename: the old key still opens the store, the new one not yet; running
    the rekey again finishes it."""
    data = tmp_path / "server"
    _fill(data, _kek(key), bulk=3)
    before = _dump(data, _kek(key))
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    killed = _cli(data, "rekey", "--key-file", str(key), "--new-key-file", str(new),
                  kill_at="written")
    assert killed.returncode == -9, killed.stderr
    assert _dump(data, _kek(key)) == before
    with pytest.raises(StoreKeyError):
        LmdbStore(data, kek=_kek(new))
    done = _cli(data, "rekey", "--key-file", str(key), "--new-key-file", str(new), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["command"] == "rekey"
    assert _dump(data, _kek(new)) == before


def test_encrypt_message_names_a_key_to_configure(tmp_path: Path, key: Path) -> None:
    """The guide passes the key as `--key-file /dev/stdin < KEYFILE`: the message must
    not tell the operator to set store.encryption_key_file = "/dev/stdin"."""
    data = tmp_path / "server"
    _fill(data)
    piped = KeyEncryptionKey(key.read_bytes(), "/dev/stdin")
    message = lmdb_atrest.encrypt(data, piped).message
    assert "/dev/stdin" not in message
    assert "set store.encryption_key_file to a file holding the key you gave on standard " \
        "input" in message
    other = tmp_path / "other"
    _fill(other)
    named = lmdb_atrest.encrypt(other, _kek(key)).message
    assert f'store.encryption_key_file = "{key}"' in named
