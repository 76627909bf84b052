"""A device store whose data.mdb is damaged (an SD card's bad block, a power loss the
filesystem did not survive), with real damaged files: every command refuses it with one
`store damaged` line naming the file (exit 6, which systemd does not restart), never
rewrites it, and never serves it as if nothing happened.

Before the fix: a data.mdb cut to 0 bytes was taken for a new store (the pending changes
silently replaced by an empty store), a truncated one killed every command with SIGBUS
(a restart every 2 s under systemd), overwritten meta pages were exit 1 (restarted too),
and damage inside the B-tree was served by `agent run` as if the store were sound.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import Agent
from agent.errors import StorageFormatError, StoreDamaged
from agent.store import ENV_DIRNAME
from schemas import wire
from schemas.collection import Catalog, example_catalog_path
from tests.agent.agentkit import compact_in_place, make_cfg, rec
from tests.cli.procs import Proc, clean_env, run_cli
from tests.helpers import wait_until
from tests.http.httpkit import Client, issue, running_api
from waystation.cli.exitcodes import EXIT_DAMAGED

PAGE = 4096
RECORDS = 300
SYNCED = 200


def _build(data_dir: Path, catalog: Catalog) -> None:
    """A store holding 200 records synced from the server and 300 pending changes,
    compacted (every page of the file is a live page of a tree, so damage anywhere hits
    data the agent reads)."""
    with Agent.open(make_cfg(data_dir), catalog) as ag:
        ag.sync.apply_delta(wire.Delta(d=[rec(f"s-{i}", i + 1, {"route": "route-42",
                                                                 "notes": "y" * 200})
                                          for i in range(SYNCED)]))
        for i in range(RECORDS):
            ag.put("tasks", f"t-{i}", {"route": "route-42", "notes": "x" * 200})
        assert ag.get("tasks", "s-7") is not None
    compact_in_place(data_dir)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Path:
    path = tmp_path_factory.mktemp("template") / "data"
    _build(path, catalog)
    return path


def _config(data_dir: Path) -> Path:
    path = data_dir / "agent.toml"
    path.write_text(f'device_id = "van-1"\nscopes = ["route-42", "depot-7", "fleet"]\n'
                    f'data_dir = "{data_dir}"\nschema_file = "{example_catalog_path()}"\n'
                    '[mqtt]\nhost = "127.0.0.1"\nport = 1\n', encoding="utf-8")
    return path


def _fresh(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _random(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def _pages(data: Path) -> int:
    return data.stat().st_size // PAGE


def _flip_bit(data: Path, offset: int) -> None:
    with data.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


# Damage that every command meets when it opens the store.
OPEN_DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated_to_0": lambda d: os.truncate(d, 0),
    "truncated_to_half_not_on_a_page": lambda d: os.truncate(d, _pages(d) // 2 * PAGE + 123),
    "truncated_to_half_on_a_page": lambda d: os.truncate(d, _pages(d) // 2 * PAGE),
    "truncated_by_the_last_page": lambda d: os.truncate(d, (_pages(d) - 1) * PAGE),
    "random_over_both_meta_pages": lambda d: _overwrite(d, 0, _random(2 * PAGE)),
    "random_over_meta_page_0": lambda d: _overwrite(d, 16, _random(PAGE - 16)),
    "random_over_the_last_page": lambda d: _overwrite(d, (_pages(d) - 1) * PAGE, _random(PAGE)),
    "replaced_by_a_directory": lambda d: (d.unlink(), d.mkdir()),
}

# Damage inside the trees: met by the service's walk when it starts.
TREE_DAMAGE: dict[str, Callable[[Path], None]] = {
    "random_over_a_middle_page":
        lambda d: _overwrite(d, _pages(d) // 2 * PAGE, _random(PAGE)),
    "one_bit_flipped_in_a_middle_page": lambda d: _flip_bit(d, _pages(d) // 2 * PAGE + 20),
    "zeros_over_a_middle_page": lambda d: _overwrite(d, _pages(d) // 2 * PAGE, bytes(PAGE)),
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "not a file"


def _assert_one_damage_line(result: subprocess.CompletedProcess[str], data: Path) -> None:
    assert result.returncode == EXIT_DAMAGED, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: store damaged: "), lines[0]
    assert str(data) in lines[0]
    assert "deploy/README.md" in lines[0]


@pytest.mark.parametrize("kind", sorted(OPEN_DAMAGE))
def test_damaged_store_is_refused_by_every_command_and_never_rewritten(
        template: Path, tmp_path: Path, kind: str) -> None:
    data_dir = _fresh(template, tmp_path / "data")
    data = data_dir / ENV_DIRNAME / "data.mdb"
    OPEN_DAMAGE[kind](data)
    before = _digest(data)
    config = str(_config(data_dir))
    env = clean_env()
    for args in (("agent", "status"), ("agent", "get", "tasks", "t-5"),
                 ("agent", "put", "tasks", "t-new", "route=route-42"),
                 ("agent", "run")):
        result = run_cli(data_dir, env, *args, "--config", config, timeout=60)
        _assert_one_damage_line(result, data)
    assert _digest(data) == before  # nothing written to it: what is readable stays so


@pytest.mark.parametrize("kind", sorted(TREE_DAMAGE))
def test_service_refuses_a_store_damaged_inside_its_trees(
        template: Path, tmp_path: Path, kind: str) -> None:
    """Damage in a page the status does not read: `agent run` (the systemd service)
    walks the trees when it starts and exits 6 instead of serving the store."""
    data_dir = _fresh(template, tmp_path / "data")
    data = data_dir / ENV_DIRNAME / "data.mdb"
    TREE_DAMAGE[kind](data)
    before = _digest(data)
    proc = Proc(data_dir, clean_env(), "agent", "agent", "run", "--config",
                str(_config(data_dir)))
    try:
        code = proc.wait_exit(60)  # before the fix: it ran on, serving the damaged store
    finally:
        proc.close()
    assert code == EXIT_DAMAGED, proc.text()[-2000:]
    text = proc.text()
    assert "store damaged" in text and str(data) in text
    assert "Traceback" not in text
    assert _digest(data) == before


def test_intact_store_still_runs(template: Path, tmp_path: Path) -> None:
    """The checks refuse damage only: the same store undamaged opens and the service
    starts (its walk finds nothing)."""
    data_dir = _fresh(template, tmp_path / "data")
    proc = Proc(data_dir, clean_env(), "agent", "agent", "run", "--config",
                str(_config(data_dir)))
    try:
        proc.wait_log("agent_started")
    finally:
        proc.close()
    result = run_cli(data_dir, clean_env(), "agent", "status", "--config",
                     str(_config(data_dir)))
    assert result.returncode == 0, result.stderr
    assert f"{RECORDS} " in result.stdout or str(RECORDS) in result.stdout


def test_lock_file_garbage_or_missing_is_harmless(template: Path, tmp_path: Path,
                                                  catalog: Catalog) -> None:
    """lock.mdb holds no data: LMDB rebuilds a garbage or missing one when no process
    has the store open, and every pending change is still there."""
    for how in ("garbage", "missing"):
        data_dir = _fresh(template, tmp_path / how)
        lock = data_dir / ENV_DIRNAME / "lock.mdb"
        if how == "garbage":
            _overwrite(lock, 0, _random(8192))
        else:
            lock.unlink()
        with Agent.open(make_cfg(data_dir), catalog) as ag:
            assert len(ag.pending()) == RECORDS
            assert ag.get("tasks", f"s-{SYNCED - 1}") is not None


def test_store_of_a_newer_agent_is_refused_and_not_rewritten(
        template: Path, tmp_path: Path, catalog: Catalog) -> None:
    """A store stamped with a format this agent does not know (a newer agent wrote it):
    StorageFormatError (exit 2, not restarted), and not one byte of it is rewritten."""
    data_dir = _fresh(template, tmp_path / "data")
    env_dir = data_dir / ENV_DIRNAME
    env = lmdb.open(str(env_dir), max_dbs=32)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True, db=meta) as txn:
            txn.put(b"format", b"99")
    finally:
        env.close()
    before = _digest(env_dir / "data.mdb")
    with pytest.raises(StorageFormatError, match="format 99"):
        Agent.open(make_cfg(data_dir), catalog)
    result = run_cli(data_dir, clean_env(), "agent", "run", "--config", str(_config(data_dir)))
    assert result.returncode == 2, result.stderr
    assert "format 99" in result.stderr and "Traceback" not in result.stderr
    assert _digest(env_dir / "data.mdb") == before


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ws-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_damage_found_mid_run_answers_503_storage_damaged_and_stops_writes(
        template: Path, short_dir: Path, catalog: Catalog) -> None:
    """The store is sound when the API starts; then every page but the two meta pages
    reads as zeros (what a failing SD card returns). A read answers 503 storage_damaged
    naming the file (before: 503 storage_unavailable with LMDB's words), and a write
    that would touch no damaged page is refused with the same message: writing on
    into a damaged tree could only spread the damage."""
    data_dir = _fresh(template, short_dir / "data")
    data = data_dir / ENV_DIRNAME / "data.mdb"
    cfg = make_cfg(data_dir)
    token = issue(data_dir)
    with running_api(cfg, catalog) as (server, ag):
        assert server.socket_path is not None
        client = Client(server.socket_path, token)
        try:
            assert client.call("GET", "/v1/collections/tasks/records/t-5").status == 200
            _overwrite(data, 2 * PAGE, bytes(data.stat().st_size - 2 * PAGE))
            r = client.call("GET", "/v1/collections/tasks/records/t-5")
            assert r.status == 503, r.body
            assert r.body["code"] == "storage_damaged"
            assert "store damaged" in r.body["message"] and str(data) in r.body["message"]
            with pytest.raises(StoreDamaged):
                ag.store.write(lambda tx: None)
            r = client.call("PATCH", "/v1/collections/tasks/records/t-new",
                            {"fields": {"route": "route-42"}})
            assert r.status == 503 and r.body["code"] == "storage_damaged", r.body
        finally:
            client.close()


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page=st.integers(min_value=2), offset=st.integers(0, PAGE - 1),
       length=st.integers(1, 64), seed=st.integers(0, 2**32))
def test_random_damage_anywhere_is_refused_or_harmless_never_a_crash(
        template: Path, tmp_path_factory: pytest.TempPathFactory, page: int, offset: int,
        length: int, seed: int) -> None:
    """Random bytes at a random place of a page past the header: `agent run` either
    refuses the store (exit 6, one line) or starts on it (the bytes landed where LMDB
    cannot tell: a value); never a signal, a traceback or another exit code."""
    data_dir = _fresh(template, tmp_path_factory.mktemp("h") / "data")
    data = data_dir / ENV_DIRNAME / "data.mdb"
    pages = _pages(data)
    _overwrite(data, (2 + page % (pages - 2)) * PAGE + offset,
               _random(min(length, PAGE - offset), seed))
    proc = Proc(data_dir, clean_env(), "agent", "agent", "run", "--config",
                str(_config(data_dir)))
    try:
        wait_until(lambda: proc.popen.poll() is not None or "agent_started" in proc.text(),
                   60)
        code = proc.popen.poll()
    finally:
        proc.close()
    if code is not None:
        assert code == EXIT_DAMAGED, proc.text()[-2000:]
        assert "store damaged" in proc.text() and "Traceback" not in proc.text()


def test_a_store_being_created_by_another_process_is_not_damage(
        template: Path, tmp_path: Path, catalog: Catalog) -> None:
    """data.mdb is 0 bytes for an instant while another process creates the store
    (LMDB writes its header pages under its own lock, after this check): an opener
    that meets it then waits for the header instead of calling the store damaged."""
    data_dir = tmp_path / "data"
    env_dir = data_dir / ENV_DIRNAME
    env_dir.mkdir(parents=True)
    data = env_dir / "data.mdb"
    data.write_bytes(b"")
    done = threading.Timer(0.3, lambda: data.write_bytes(
        (template / ENV_DIRNAME / "data.mdb").read_bytes()))
    done.start()
    try:
        with Agent.open(make_cfg(data_dir), catalog) as ag:
            assert len(ag.pending()) == RECORDS
    finally:
        done.join()
