"""`waystation server get|list|export` and `server deadletters show|retry|discard` as
real processes (the installed `waystation` executable), on LMDB and on PostgreSQL.

The store is filled by the real engine (records, refused messages), then the operator's
commands run as separate processes against it, as next to a running server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.server.store import open_store
from broker.server.store.base import DeadLetter, Store
from tests.server.helpers import T0, changes, hp, make_engine
from waystation.config import ServerConfig, load_config

WAYSTATION = str(Path(sys.executable).parent / "waystation")


@pytest.fixture
def env(server_cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment, on an LMDB store and on a fresh PostgreSQL database."""
    return server_cli_env


def _open(env: dict[str, str]) -> Store:
    return open_store(load_config(ServerConfig, None, env))


def ws(env: dict[str, str], *argv: str, cwd: Path | None = None
       ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    return subprocess.run([WAYSTATION, *argv], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd)


def _inv(n: int, key: str, scope: str = "d1", **extra: object) -> dict[str, object]:
    ch: dict[str, object] = {"n": n, "h": hp(T0 + n), "c": "inventory", "k": key, "s": scope,
                             "b": 0, "op": "put", "f": {"depot": scope, "sku": key}}
    ch.update(extra)
    return ch


def _seed(env: dict[str, str]) -> None:
    """Records (one deleted) from van-1; a batch from unknown van-9 (a dead letter)."""
    data = Path(env["WAYSTATION_SERVER__DATA_DIR"])
    engine, store, _ = make_engine(data, {"van-1": ["d1", "d2"]}, store=_open(env))
    try:
        engine.handle_up("van-1", changes("van-1", [
            _inv(1, "sku-a", i={"stock": 7}, a={"tags": ["cold"]}),
            _inv(2, "sku-b", "d2"),
            _inv(3, "sku-c"),
            {"n": 4, "h": hp(T0 + 4), "c": "inventory", "k": "sku-c", "s": "d1", "b": 0,
             "op": "del"}]))
        engine.handle_up("van-9", changes("van-9", [_inv(1, "sku-z", i={"stock": 3})]))
        engine.tick()
    finally:
        store.close()


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_get_list_export(env: dict[str, str], tmp_path: Path) -> None:
    _seed(env)
    got = ws(env, "server", "get", "inventory", "sku-a", "--json")
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["fields"] == {"depot": "d1", "sku": "sku-a", "stock": 7, "tags": ["cold"]}
    assert doc["field_info"]["stock"]["merge"] == "counter" and doc["deleted"] is False
    human = ws(env, "server", "get", "inventory", "sku-a").stdout
    assert "inventory/sku-a  scope d1" in human and "stock" in human and "[counter]" in human
    deleted = ws(env, "server", "get", "inventory", "sku-c")
    assert deleted.returncode == 0 and "DELETED by van-1 (change 4)" in deleted.stdout

    page = json.loads(ws(env, "server", "list", "inventory", "--limit", "1", "--json").stdout)
    assert [r["key"] for r in page["records"]] == ["sku-a"] and page["next_after"] == "sku-a"
    rest = json.loads(ws(env, "server", "list", "inventory", "--after", "sku-a",
                         "--json").stdout)
    assert [r["key"] for r in rest["records"]] == ["sku-b"] and rest["next_after"] is None
    scoped = json.loads(ws(env, "server", "list", "inventory", "--scope", "d2",
                           "--json").stdout)
    assert [r["key"] for r in scoped["records"]] == ["sku-b"]
    with_deleted = ws(env, "server", "list", "inventory", "--deleted")
    assert "sku-c (deleted)" in with_deleted.stdout
    table = ws(env, "server", "list", "inventory", "--limit", "1").stdout
    assert table.splitlines()[0].split() == ["KEY", "SCOPE", "VERSION", "UPDATED", "FIELDS"]
    assert "--after sku-a" in table
    empty = ws(env, "server", "list", "tasks")
    assert empty.returncode == 0 and "no tasks records" in empty.stdout

    lines = ws(env, "server", "export").stdout.splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["sku-a", "sku-b"]
    out = tmp_path / "export.jsonl"
    done = ws(env, "server", "export", "--collection", "inventory", "--deleted",
              "--out", str(out))
    assert done.returncode == 0 and "exported 3 records" in done.stdout
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(d["key"], d["deleted"]) for d in docs] == [
        ("sku-a", False), ("sku-b", False), ("sku-c", True)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


@pytest.mark.parametrize("argv, code, text", [
    (["server", "get", "inventory", "nope"], 1, "no record inventory/nope"),
    (["server", "get", "ghosts", "x"], 1, "no collection 'ghosts'"),
    (["server", "list", "ghosts"], 1, "no collection 'ghosts'"),
    (["server", "export", "--collection", "ghosts"], 1, "no collection 'ghosts'"),
    (["server", "list", "inventory", "--limit", "0"], 2, "--limit"),
    (["server", "list", "inventory", "--limit", "100001"], 2, "--limit"),
    (["server", "get", "inventory", "é\u202e" * 300], 1, "no record"),
    (["server", "deadletters", "show", "abc"], 2, "not a dead letter id"),
    (["server", "deadletters", "show", "-5"], 2, "not a dead letter id"),
    (["server", "deadletters", "show", "999999"], 1, "no dead letter 999999"),
    (["server", "deadletters", "retry", "999999"], 1, "no dead letter 999999"),
    (["server", "deadletters", "discard"], 2, "--all-for"),
    (["server", "deadletters", "discard", "1", "--all-for", "van-9"], 2, "--all-for"),
])
def test_wrong_input_is_one_clear_line(env: dict[str, str], argv: list[str], code: int,
                                       text: str) -> None:
    _seed(env)
    proc = ws(env, *argv)
    assert proc.returncode == code, proc.stderr
    line = proc.stderr.strip().splitlines()[-1] if code == 2 else _error_line(proc)
    assert text in line, proc.stderr


def test_export_never_overwrites(env: dict[str, str], tmp_path: Path) -> None:
    _seed(env)
    out = tmp_path / "keep.jsonl"
    out.write_text("precious\n")
    proc = ws(env, "server", "export", "--out", str(out))
    assert proc.returncode == 2 and "exists already" in _error_line(proc)
    assert out.read_text() == "precious\n"


def test_deadletters_show_retry_discard(env: dict[str, str], tmp_path: Path) -> None:
    _seed(env)
    listed = json.loads(ws(env, "server", "deadletters", "list", "--json").stdout)
    [letter] = [d for d in listed if d["device"] == "van-9"]
    lid = str(letter["id"])
    assert json.loads(ws(env, "server", "deadletters", "--json").stdout) == listed  # bare

    shown = json.loads(ws(env, "server", "deadletters", "show", lid, "--json").stdout)
    assert shown["code"] == "unknown_device" and shown["message"]["dev"] == "van-9"
    human = ws(env, "server", "deadletters", "show", lid).stdout
    assert "from van-9 (up topic)" in human and '"sku-z"' in human

    still = ws(env, "server", "deadletters", "retry", lid)
    assert still.returncode == 1 and "still refused: unknown_device" in still.stdout
    enrol = ws(env, "device", "add", "van-9", "--scope", "d1", "--out", str(tmp_path / "e"))
    assert enrol.returncode == 0, enrol.stderr
    retried = ws(env, "server", "deadletters", "retry", lid, "--json")
    assert retried.returncode == 0, retried.stderr
    result = json.loads(retried.stdout)
    assert result["removed"] and [c["result"] for c in result["changes"]] == ["applied"]
    got = json.loads(ws(env, "server", "get", "inventory", "sku-z", "--json").stdout)
    assert got["fields"]["stock"] == 3
    again = ws(env, "server", "deadletters", "retry", lid)
    assert again.returncode == 1 and "no dead letter" in _error_line(again)

    store = _open(env)
    try:
        for raw in (b"junk-1", b"junk-2"):
            store.transact(lambda txn, raw=raw: txn.add_dead_letter(
                DeadLetter(0, T0, "van-7", "up", "malformed", "bad", raw)))
    finally:
        store.close()
    gone = ws(env, "server", "deadletters", "discard", "--all-for", "van-7", "--json")
    assert gone.returncode == 0 and json.loads(gone.stdout) == {"discarded": 2}
    left = json.loads(ws(env, "server", "deadletters", "list", "--json").stdout)
    assert all(d["device"] != "van-7" for d in left)
    assert json.loads(ws(env, "server", "get", "inventory", "sku-z", "--json").stdout)[
        "fields"]["stock"] == 3   # the retry applied once
