"""Remote wipe on the device (agent.wipe): data key first, then the files; a new empty
store; other openers refused; a crash half-way finished on the next open."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.api import Agent
from agent.errors import EncryptionKeyError, StoreGone
from agent.keyring import DEK_FILE
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from waystation.config import AgentConfig

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SECRET = "secret-note-4711"


def _cfg(data_dir: Path, key: Path | None = None, **kw: object) -> AgentConfig:
    cfg = make_cfg(data_dir, **kw)  # type: ignore[arg-type]
    if key is None:
        return cfg
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"encryption_key_file": key})})


def _write_secret(ag: Agent) -> None:
    ag.put("tasks", "t-1", {"route": "route-42", "notes": SECRET})


def test_wipe_of_a_plain_store_leaves_no_record_bytes(tmp_path: Path, catalog: Catalog) -> None:
    """The store file is replaced: none of the old record bytes are in the new one."""
    cfg = _cfg(tmp_path / "d")
    with Agent.open(cfg, catalog) as ag:
        _write_secret(ag)
        data = tmp_path / "d" / "agent.lmdb" / "data.mdb"
        assert SECRET.encode() in data.read_bytes()
        report = ag.wipe("wipe-1")
        assert not report.key_destroyed
        assert SECRET.encode() not in data.read_bytes()
        assert ag.get("tasks", "t-1") is None and ag.status().pending == 0


def test_wipe_of_an_encrypted_store_destroys_the_data_key_first(
        tmp_path: Path, catalog: Catalog) -> None:
    """Envelope encryption: the wrapped data key is destroyed, so a copy of the old file
    cannot be read even with the operator's key; the new store has a new data key."""
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    cfg = _cfg(tmp_path / "d", key)
    env_dir = tmp_path / "d" / "agent.lmdb"
    with Agent.open(cfg, catalog) as ag:
        _write_secret(ag)
        assert SECRET.encode() not in (env_dir / "data.mdb").read_bytes()  # sealed
        stolen = tmp_path / "stolen"
        stolen.mkdir()
        shutil.copy(env_dir / "data.mdb", stolen / "data.mdb")  # what an attacker kept
        old_dek = (env_dir / DEK_FILE).read_bytes()
        report = ag.wipe("wipe-1")
        assert report.key_destroyed
        assert (env_dir / DEK_FILE).read_bytes() != old_dek
        assert ag.get("tasks", "t-1") is None
        ag.put("tasks", "t-2", {"route": "route-42"})  # the new store works, encrypted
    assert key.read_bytes() == b"k" * 32  # the operator's key stays: it wraps the new one
    thief = tmp_path / "thief"
    (thief / "agent.lmdb").mkdir(parents=True)
    shutil.copy(stolen / "data.mdb", thief / "agent.lmdb" / "data.mdb")
    with pytest.raises(EncryptionKeyError):
        Agent.open(_cfg(thief, key), catalog)


def test_wipe_of_a_legacy_encrypted_store_destroys_its_key_file(
        tmp_path: Path, catalog: Catalog) -> None:
    """A store encrypted by the first release (the key file's bytes are its data key,
    committed fixture) opens and reads; its wipe overwrites that key file."""
    src = FIXTURES / "agent_format1_encrypted"
    key = tmp_path / "key"
    shutil.copy(src / "key", key)
    (tmp_path / "d" / "agent.lmdb").mkdir(parents=True)
    shutil.copy(src / "data.mdb", tmp_path / "d" / "agent.lmdb" / "data.mdb")
    cfg = _cfg(tmp_path / "d", key, device="van-enc", scopes=("route-1",))
    ag = Agent.open(cfg, catalog)
    record = ag.get("tasks", "t-1")
    assert record is not None and record.fields["notes"] == SECRET
    old_key = key.read_bytes()
    report = ag.wipe("wipe-1")
    assert report.key_destroyed and key.read_bytes() != old_key  # overwritten: a new key
    assert ag.get("tasks", "t-1") is None
    ag.close()
    thief = tmp_path / "thief"
    (thief / "agent.lmdb").mkdir(parents=True)
    shutil.copy(src / "data.mdb", thief / "agent.lmdb" / "data.mdb")
    with pytest.raises(EncryptionKeyError):  # the old file is unreadable with what is left
        Agent.open(_cfg(thief, key, device="van-enc", scopes=("route-1",)), catalog)


def test_another_opener_sees_an_empty_store_and_writes_into_the_new_one(
        tmp_path: Path, catalog: Catalog) -> None:
    """An app that had the store open (same process) reads nothing after the wipe, and
    its next write goes to the new store (never into the deleted files)."""
    cfg = _cfg(tmp_path / "d")
    wiper = Agent.open(cfg, catalog)
    app = Agent.open(cfg, catalog)
    _write_secret(app)
    wiper.wipe("wipe-1")
    assert app.list("tasks") == []
    app.put("tasks", "t-3", {"route": "route-42"})
    app.close()
    with Agent.open(cfg, catalog) as again:
        assert again.sync.command_done("wipe-1")
        assert again.get("tasks", "t-3") is not None and again.get("tasks", "t-1") is None
    wiper.close()


def test_a_bare_core_on_a_wiped_store_refuses_writes(tmp_path: Path, catalog: Catalog) -> None:
    """Below the Agent (which re-opens), the old store refuses every write: StoreGone."""
    cfg = _cfg(tmp_path / "d")
    wiper = Agent.open(cfg, catalog)
    app = Agent.open(cfg, catalog)
    core = app._core
    wiper.wipe("wipe-1")
    with pytest.raises(StoreGone, match="wiped by the operator"):
        core.write(lambda work: work.next_n())
    app.close()
    wiper.close()


def test_another_process_writes_into_the_new_store_after_the_wipe(
        tmp_path: Path, catalog: Catalog) -> None:
    """A separate process that opened the store before the wipe reads nothing of the
    old one, and its write lands in the new store."""
    cfg = _cfg(tmp_path / "d")
    with Agent.open(cfg, catalog) as ag:
        _write_secret(ag)
    script = textwrap.dedent(f"""
        import sys
        from agent.api import Agent
        from agent.errors import StoreGone
        from schemas.collection import example_catalog_path, load_catalog
        from tests.agent.agentkit import make_cfg
        from pathlib import Path
        ag = Agent.open(make_cfg(Path({str(tmp_path / 'd')!r})),
                        load_catalog(example_catalog_path()))
        print("open", flush=True)
        sys.stdin.readline()
        try:
            before = len(ag.list("tasks"))
            ag.put("tasks", "t-5", {{"route": "route-42"}})
            print("written", before)
        except StoreGone:
            print("gone")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "open"
    with Agent.open(cfg, catalog) as ag:
        ag.wipe("wipe-1")
    out, _ = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0 and out.strip() == "written 0"
    with Agent.open(cfg, catalog) as ag:
        assert ag.get("tasks", "t-5") is not None and ag.get("tasks", "t-1") is None


def test_a_wipe_interrupted_after_emptying_is_finished_on_open(
        tmp_path: Path, catalog: Catalog) -> None:
    """A crash after step 1 (the store emptied and marked gone) is finished at the next
    open: a new store that remembers the wipe."""
    from agent import wipe

    cfg = _cfg(tmp_path / "d")
    ag = Agent.open(cfg, catalog)
    _write_secret(ag)
    core = ag._core
    core.store.write(lambda tx: tx.set_meta("gone", {"t": 1, "id": "wipe-9"}))
    assert wipe.is_gone(core.store)
    ag.close()
    with Agent.open(cfg, catalog) as again:
        assert again.sync.command_done("wipe-9")
        assert again.get("tasks", "t-1") is None
        assert SECRET.encode() not in (tmp_path / "d" / "agent.lmdb" / "data.mdb").read_bytes()
        again.put("tasks", "t-2", {"route": "route-42"})
