"""Encryption at rest switched on an existing store (`waystation agent encrypt`/`decrypt`)
and the key changed in O(1) (`agent rekey`): nothing lost, the right errors, and a crash
(kill -9 of the real command) at any step leaves a store the same command finishes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import atrest
from agent.api import Agent
from agent.errors import ConversionPending, EncryptionKeyError, StoreInUse
from agent.keyring import DEK_FILE, KeyEncryptionKey
from agent.service.lock import acquire_service_lock
from agent.store import Store
from schemas.collection import Catalog
from tests.agent.atrest_kit import SECRET, cfg_for, dump, fill, plain_values_visible
from waystation.atrest.rewrite import KILL_POINT_ENV
from waystation.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "agent.key"
    path.write_bytes(os.urandom(32))
    return path


def _kek(path: Path) -> KeyEncryptionKey:
    return KeyEncryptionKey.from_file(path)


def test_encrypt_then_decrypt_keeps_every_value(tmp_path: Path, catalog: Catalog,
                                                key: Path) -> None:
    """A plain store encrypted in place reads back identically with the key (records,
    outbox, conflicts, dead letters), shows no value in the file; decrypt goes back."""
    data = tmp_path / "d"
    fill(data, catalog)
    before = dump(data, None)
    assert plain_values_visible(data)
    out = atrest.encrypt(data, _kek(key), batch=97)
    assert out.changed and out.before == "plain" and out.after == "envelope"
    assert out.values == sum(len(before[n]) for n in ("view", "base", "stamps", "outbox",
                                                      "conflicts", "deadletters", "idem"))
    assert not plain_values_visible(data)  # compacted: no freed page keeps old values
    assert dump(data, key) == before
    with pytest.raises(EncryptionKeyError, match="encrypted"):
        Store.open(data, create=False)  # without the key: refused, naming the setting
    with Agent.open(cfg_for(data, key), catalog) as ag:  # the agent works on it
        assert ag.get("tasks", "t-3").fields["notes"] == f"{SECRET} 3"  # type: ignore[union-attr]
        ag.put("tasks", "t-9", {"route": "route-42", "notes": "after"})
        assert len(ag.pending()) == 6
    again = atrest.encrypt(data, _kek(key))
    assert not again.changed  # idempotent
    back = atrest.decrypt(data, _kek(key), batch=50)
    assert back.after == "plain" and not (data / "agent.lmdb" / DEK_FILE).exists()
    with Agent.open(cfg_for(data), catalog) as ag:
        assert ag.get("tasks", "t-9").fields["notes"] == "after"  # type: ignore[union-attr]
        assert len(ag.pending()) == 6


def test_encrypt_drops_plain_text_index_entries(tmp_path: Path, catalog: Catalog,
                                               key: Path) -> None:
    """Index keys are field values in plain text: encrypt drops them (none left in the
    file); the agent rebuilds them at its next start only with plaintext_indexes."""
    data = tmp_path / "d"
    fill(data, catalog, bulk=20)

    def index_entries(kek: KeyEncryptionKey | None) -> int:
        store = Store.open(data, kek=kek, create=False)
        try:
            return store.read(lambda tx: tx.count("index"))
        finally:
            store.close()

    assert index_entries(None) > 0  # ("route", "eta") among them: route-42 in plain text
    atrest.encrypt(data, _kek(key))
    assert index_entries(_kek(key)) == 0
    assert b"route-42" not in (data / "agent.lmdb" / "data.mdb").read_bytes()
    with Agent.open(cfg_for(data, key), catalog):
        pass
    assert index_entries(_kek(key)) == 0
    cfg = cfg_for(data, key)
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"plaintext_indexes": True})})
    with Agent.open(cfg, catalog) as ag:
        assert len(ag.list("tasks")) == 25
    assert index_entries(_kek(key)) > 0


def test_legacy_store_moves_to_a_data_key(tmp_path: Path, catalog: Catalog, key: Path) -> None:
    """A store sealed with the key file's own bytes (before data keys) gets a data key;
    afterwards rekey works on it."""
    data = tmp_path / "d"
    fill(data, catalog, key)
    env_dir = data / "agent.lmdb"
    # make it a legacy store: re-seal with the key file's bytes, drop the data key
    atrest.decrypt(data, _kek(key))
    legacy = _kek(key).legacy_cipher()
    store = Store.open(data, create=False)
    store.write(lambda tx: tx.set_meta("enc", legacy.check_token().hex()))
    store.close()
    raw = atrest._Raw(env_dir, 64)
    from waystation.atrest import rewrite
    rewrite.start(raw.target, {"from": "plain", "to": "legacy", "check": None})
    rewrite.convert(raw.target, atrest._NAMES, None, legacy)
    rewrite.write(raw.target, lambda txn: txn.delete(atrest.MARKER, db=raw.dbs["meta"]))
    raw.close()
    assert not (env_dir / DEK_FILE).exists()
    before = dump(data, key)  # opens as legacy
    with pytest.raises(EncryptionKeyError, match="before envelope encryption"):
        atrest.rekey(data, _kek(key), _kek(key))
    out = atrest.encrypt(data, _kek(key), batch=64)
    assert out.before == "legacy" and (env_dir / DEK_FILE).exists()
    assert dump(data, key) == before
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    atrest.rekey(data, _kek(key), _kek(new))
    assert dump(data, new) == before


def test_rekey_rewraps_in_constant_time_and_the_old_key_stops_working(
        tmp_path: Path, catalog: Catalog, key: Path) -> None:
    """rekey rewrites the 48-byte data key file only: data.mdb is untouched."""
    data = tmp_path / "d"
    fill(data, catalog, key)
    before = dump(data, key)
    mdb = data / "agent.lmdb" / "data.mdb"
    stat = mdb.stat()
    content = mdb.read_bytes()
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    out = atrest.rekey(data, _kek(key), _kek(new))
    assert out.values == 0 and mdb.read_bytes() == content
    assert mdb.stat().st_mtime_ns == stat.st_mtime_ns
    assert dump(data, new) == before
    with pytest.raises(EncryptionKeyError, match=re.escape(str(key))):
        dump(data, key)


def test_wrong_and_hostile_keys(tmp_path: Path, catalog: Catalog, key: Path) -> None:
    """Wrong key, key file too short, truncated or corrupted data key file: a clear
    error naming the file, nothing changed."""
    data = tmp_path / "d"
    fill(data, catalog, key, bulk=5)
    before = dump(data, key)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 8)
    with pytest.raises(EncryptionKeyError, match=r"wrong\.key"):
        atrest.rekey(data, _kek(wrong), _kek(key))
    with pytest.raises(EncryptionKeyError, match=r"wrong\.key"):
        atrest.decrypt(data, _kek(wrong))
    with pytest.raises(EncryptionKeyError, match="at least 16"):
        _kek(short)
    dek = data / "agent.lmdb" / DEK_FILE
    good = dek.read_bytes()
    dek.write_bytes(good[:20])  # truncated
    with pytest.raises(EncryptionKeyError, match="not a Waystation data key file"):
        atrest.rekey(data, _kek(key), _kek(wrong))
    dek.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped
    with pytest.raises(EncryptionKeyError, match=re.escape(DEK_FILE)):
        atrest.decrypt(data, _kek(key))
    dek.write_bytes(good)
    assert dump(data, key) == before
    assert not (data / "agent.lmdb" / "atrest.pending").exists()


def test_refused_while_the_service_runs_or_the_store_is_open(
        tmp_path: Path, catalog: Catalog, key: Path) -> None:
    """The service lock (a running daemon) and another process's open store refuse a
    conversion with exit code 3 and say what to stop."""
    data = tmp_path / "d"
    fill(data, catalog, bulk=5)
    lock = acquire_service_lock(data)
    try:
        with pytest.raises(Exception, match="already running") as exc:
            atrest.encrypt(data, _kek(key))
        assert getattr(exc.value, "exit_code", None) == 3
    finally:
        lock.release()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, lmdb; e = lmdb.open(sys.argv[1]); "
         "e.begin().abort(); print('ready', flush=True); sys.stdin.read()",  # idle, open
         str(data / "agent.lmdb")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreInUse, match=str(holder.pid)):
            atrest.encrypt(data, _kek(key))
    finally:
        holder.communicate("")
    assert atrest.encrypt(data, _kek(key)).changed


def _cli(data: Path, *argv: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WAYSTATION_AGENT__DATA_DIR": str(data),
           "WAYSTATION_AGENT__DEVICE_ID": "van-1", "PYTHONPATH": str(ROOT)}
    env.pop(KILL_POINT_ENV, None)
    if kill_at:
        env[KILL_POINT_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "waystation", "agent", *argv],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["dek", "marker", "batch:1", "batch:4", "renamed",
                                   "finished", "compacted"])
def test_kill_9_during_encrypt_then_rerun(tmp_path: Path, catalog: Catalog, key: Path,
                                          point: str) -> None:
    """kill -9 of `agent encrypt` at each step: the store refuses to open (saying to run
    it again), every value is intact, and running it again finishes the conversion."""
    data = tmp_path / "d"
    fill(data, catalog, bulk=200)
    before = dump(data, None)
    killed = _cli(data, "encrypt", "--key-file", str(key), "--batch", "100", kill_at=point)
    assert killed.returncode == -9, killed.stderr
    with pytest.raises(ConversionPending, match="agent encrypt"):
        Store.open(data, create=False)
    assert _cli(data, "status").returncode == 3  # the CLI refuses too, exit code 3
    done = _cli(data, "encrypt", "--key-file", str(key), "--batch", "100", "--json")
    assert done.returncode == 0, done.stderr
    assert '"after": "envelope"' in done.stdout
    assert dump(data, key) == before
    assert not plain_values_visible(data)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["marker", "batch:2", "finished"])
def test_kill_9_during_decrypt_then_rerun(tmp_path: Path, catalog: Catalog, key: Path,
                                          point: str) -> None:
    """The same for `agent decrypt`; an `encrypt` is refused until the decrypt finished."""
    data = tmp_path / "d"
    fill(data, catalog, key, bulk=200)
    before = dump(data, key)
    killed = _cli(data, "decrypt", "--key-file", str(key), "--batch", "100", kill_at=point)
    assert killed.returncode == -9, killed.stderr
    if point != "finished":
        wrong_way = _cli(data, "encrypt", "--key-file", str(key))
        assert wrong_way.returncode == 3 and "agent decrypt" in wrong_way.stderr
    done = _cli(data, "decrypt", "--key-file", str(key), "--batch", "100")
    assert done.returncode == 0, done.stderr
    assert dump(data, None) == before
    assert not (data / "agent.lmdb" / DEK_FILE).exists()


def test_cli_exit_codes_and_json(tmp_path: Path, catalog: Catalog, key: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Wrong key: exit 2 with the file named; no key at all: exit 2; rekey --json."""
    data = tmp_path / "d"
    fill(data, catalog, key, bulk=3)
    env = {"WAYSTATION_AGENT__DATA_DIR": str(data), "WAYSTATION_AGENT__DEVICE_ID": "van-1"}
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    assert main(["agent", "rekey", "--key-file", str(wrong), "--new-key-file", str(key)],
                env=env) == 2
    assert "wrong.key" in capsys.readouterr().err
    assert main(["agent", "decrypt"], env=env) == 2
    assert "--key-file" in capsys.readouterr().err
    missing = tmp_path / "nope.key"
    assert main(["agent", "rekey", "--key-file", str(key), "--new-key-file", str(missing)],
                env=env) == 2
    assert "nope.key" in capsys.readouterr().err
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    cred = tmp_path / "creds"
    cred.mkdir()
    (cred / "agent-key").write_bytes(key.read_bytes())
    assert main(["agent", "rekey", "--key-file", "${CREDENTIALS_DIRECTORY}/agent-key",
                 "--new-key-file", str(new), "--json"],
                env={**env, "CREDENTIALS_DIRECTORY": str(cred)}) == 0

    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "rekey" and doc["values"] == 0 and doc["after"] == "envelope"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["written", "rekeyed"])
def test_kill_9_during_rekey_leaves_one_valid_wrap(tmp_path: Path, catalog: Catalog,
                                                   key: Path, point: str) -> None:
    """kill -9 of `agent rekey` before the rename (new wrap only in the temp file) or
    after it: exactly one of the two keys opens the store, never neither; a rekey run
    again with that key finishes the rotation."""
    data = tmp_path / "d"
    fill(data, catalog, key, bulk=5)
    before = dump(data, key)
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    killed = _cli(data, "rekey", "--key-file", str(key), "--new-key-file", str(new),
                  kill_at=point)
    assert killed.returncode == -9, killed.stderr
    opens = []
    for candidate in (key, new):
        try:
            assert dump(data, candidate) == before
            opens.append(candidate)
        except EncryptionKeyError:
            pass
    assert opens == ([key] if point == "written" else [new])
    if point == "written":
        done = _cli(data, "rekey", "--key-file", str(key), "--new-key-file", str(new))
        assert done.returncode == 0, done.stderr
    assert dump(data, new) == before


def test_run_as_another_user_than_the_store_owner_is_refused(
        tmp_path: Path, catalog: Catalog, key: Path) -> None:
    """As root on the service user's store, encrypt refuses (the files it writes would be
    root's, unreadable by the service) and says how to run it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the store to another user")
    data = tmp_path / "d"
    fill(data, catalog, bulk=2)
    env_dir = data / "agent.lmdb"
    os.chown(env_dir, 65534, 65534)
    with pytest.raises(Exception, match="runuser -u") as exc:
        atrest.encrypt(data, _kek(key))
    assert getattr(exc.value, "exit_code", None) == 3
    os.chown(env_dir, 0, 0)


def test_the_key_on_standard_input(tmp_path: Path, catalog: Catalog, key: Path) -> None:
    """--key-file /dev/stdin: how root hands the key to a command run as the service
    user (runuser ... < KEYFILE)."""
    data = tmp_path / "d"
    fill(data, catalog, bulk=2)
    env = {**os.environ, "WAYSTATION_AGENT__DATA_DIR": str(data),
           "WAYSTATION_AGENT__DEVICE_ID": "van-1", "PYTHONPATH": str(ROOT)}
    with key.open("rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "waystation", "agent", "encrypt",
                               "--key-file", "/dev/stdin", "--json"], stdin=stdin, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["after"] == "envelope"
    # The guide's way to pass the key: the message must not tell the operator to keep
    # (or configure) "the key file /dev/stdin".
    assert "/dev/stdin" not in doc["message"] and "standard input" in doc["message"]
    assert len(dump(data, key)["view"]) == 7


def test_a_damaged_check_token_is_a_key_error_not_a_crash(tmp_path: Path, catalog: Catalog,
                                                          key: Path) -> None:
    """meta.enc altered in the file (not hex): decrypt and rekey say the key does not
    fit, with no traceback, and change nothing."""
    data = tmp_path / "d"
    fill(data, catalog, key, bulk=2)
    raw = atrest._Raw(data / "agent.lmdb", 64)
    from waystation.atrest import rewrite
    rewrite.write(raw.target, lambda txn: txn.put(b"enc", b'"not-hex!"', db=raw.dbs["meta"]))
    raw.close()
    with pytest.raises(EncryptionKeyError, match="not the key"):
        atrest.decrypt(data, _kek(key))
    with pytest.raises(EncryptionKeyError, match="not the key"):
        atrest.rekey(data, _kek(key), _kek(key))
    assert not (data / "agent.lmdb" / "atrest.pending").exists()


def test_rekey_with_streamed_keys_names_them_as_given(tmp_path: Path, catalog: Catalog,
                                                      key: Path) -> None:
    """The guide's rekey passes both keys as streams (`--key-file /dev/stdin
    --new-key-file /dev/fd/3 < $K 3< $K.new`): the message said to point
    storage.encryption_key_file at /dev/fd/3."""
    data = tmp_path / "d"
    fill(data, catalog, key, bulk=2)
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    streamed_old = KeyEncryptionKey(key.read_bytes(), "/dev/stdin")
    streamed_new = KeyEncryptionKey(new.read_bytes(), "/dev/fd/3")
    message = atrest.rekey(data, streamed_old, streamed_new).message
    assert "at /dev/fd/3" not in message and "wrapped with /dev/fd/3" not in message
    assert "the new key you gave on /dev/fd/3" in message
    assert "the old key you gave on /dev/stdin no longer opens" in message
    assert "at a file holding it" in message
    # From files, the files are named as before.
    message = atrest.rekey(data, _kek(new), _kek(key)).message
    assert f"wrapped with {key}" in message and f"{new} no longer opens" in message
