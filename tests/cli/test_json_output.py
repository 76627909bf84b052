"""`--json` on every command that prints data: stdout is ONE JSON document with stable
keys (nothing else on stdout), for the agent's writes and reads, the `device` and
`server` commands (LMDB and PostgreSQL stores), `broker passwd` and `config show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.server.store import open_store
from tests.server.helpers import T0, changes, hp, make_engine, status, task
from waystation.cli import build_parser, command_paths, main
from waystation.config import ServerConfig, load_config

# Commands that print data and so must take --json (the others run daemons, write files
# or stream JSON lines by design: `agent watch --json`, `server export`).
WITHOUT_JSON = {"demo", "agent run", "server run", "broker run", "schema export",
                "agent watch", "server export"}


def _doc(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    code = main([*argv, "--json"], env=env)
    out = capsys.readouterr()
    assert code == 0, (argv, out.err)
    return json.loads(out.out)  # the whole of stdout is one document


def test_every_data_command_has_json() -> None:
    parser = build_parser()
    leaves = {" ".join(p) for p in command_paths(parser)
              if not any(" ".join(p) != " ".join(q) and " ".join(q).startswith(" ".join(p) + " ")
                         for q in command_paths(parser))}
    for leaf in sorted(leaves - WITHOUT_JSON):
        sub = parser
        for word in leaf.split():
            sub = next(a for a in sub._actions if hasattr(a, "choices") and a.choices
                       and word in a.choices).choices[word]
        assert any("--json" in a.option_strings for a in sub._actions), leaf


def test_agent_writes_and_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"WAYSTATION_AGENT__DATA_DIR": str(tmp_path / "agent"),
           "WAYSTATION_AGENT__DEVICE_ID": "van-1",
           "WAYSTATION_AGENT__SCOPES": '["route-1"]'}
    keys = {"collection", "key", "scope", "state", "n", "change_id", "stamp", "message"}
    put = _doc(["agent", "put", "tasks", "t-1", "route=route-1", "status=out"], env, capsys)
    assert set(put) == keys and put["state"] == "pending" and put["collection"] == "tasks"
    incr = _doc(["agent", "incr", "tasks", "t-1", "attempts", "2"], env, capsys)
    assert set(incr) == keys and incr["n"] == put["n"] + 1
    added = _doc(["agent", "add", "tasks", "t-1", "labels", "fragile"], env, capsys)
    assert set(added) == keys
    removed = _doc(["agent", "remove", "tasks", "t-1", "labels", "fragile"], env, capsys)
    assert set(removed) == keys
    record = _doc(["agent", "get", "tasks", "t-1"], env, capsys)
    assert record["fields"]["attempts"] == 2
    assert [r["key"] for r in _doc(["agent", "list", "tasks"], env, capsys)] == ["t-1"]
    assert _doc(["agent", "status"], env, capsys)["device_id"] == "van-1"
    assert _doc(["agent", "deadletters"], env, capsys) == []
    assert _doc(["agent", "conflicts"], env, capsys) == []
    deleted = _doc(["agent", "delete", "tasks", "t-1"], env, capsys)
    assert set(deleted) == keys
    token = _doc(["agent", "token", "add", "app1", "--read", "tasks"], env, capsys)
    assert token["app"] == "app1" and token["token"]
    assert [t["app"] for t in _doc(["agent", "token", "list"], env, capsys)] == ["app1"]
    assert _doc(["agent", "token", "remove", "app1"], env, capsys) == {"removed": 1,
                                                                       "ident": "app1"}


@pytest.fixture
def server_env(server_cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment, on an LMDB store and on a fresh PostgreSQL database."""
    return server_cli_env


def _seed_conflict(env: dict[str, str]) -> None:
    store = open_store(load_config(ServerConfig, None, env))
    engine, store, _ = make_engine(Path(env["WAYSTATION_SERVER__DATA_DIR"]),
                                   {"van-1": ["r1"], "van-2": ["r1"]}, store=store)
    try:
        engine.handle_status("van-1", status("van-1"))
        engine.handle_up("van-1", changes("van-1", [task(1, "t-1", address="Dock 1")]))
        engine.handle_up("van-2", changes("van-2", [task(1, "t-1", h=hp(T0 + 5),
                                                         create=False, address="Dock 2")]))
        engine.tick()
    finally:
        store.close()


def test_server_and_device_commands(server_env: dict[str, str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    env = server_env
    added = _doc(["device", "add", "van-9", "--scope", "r1", "--out", str(tmp_path / "o")],
                 env, capsys)
    assert added["device"] == "van-9" and added["scopes"] == ["r1"]
    assert Path(added["agent_config"]).is_file()
    assert [d["id"] for d in _doc(["device", "list"], env, capsys)] == ["van-9"]
    wipe = _doc(["device", "wipe", "van-9"], env, capsys)
    assert wipe["device"] == "van-9" and wipe["command"]["cmd"] == "wipe"
    assert _doc(["device", "resync", "van-9"], env, capsys)["command"]["cmd"] == "resync"
    assert _doc(["device", "disable", "van-9"], env, capsys)["enabled"] is False
    assert _doc(["device", "enable", "van-9"], env, capsys)["enabled"] is True
    removed = _doc(["device", "remove", "van-9"], env, capsys)
    assert removed == {"device": "van-9", "removed": True, "login_removed": True}
    _seed_conflict(env)
    assert _doc(["server", "status"], env, capsys)["open_conflicts"] == 1
    assert {d["id"] for d in _doc(["server", "devices"], env, capsys)} >= {"van-1", "van-2"}
    (conflict,) = _doc(["server", "conflicts"], env, capsys)
    resolved = _doc(["server", "resolve", str(conflict["id"]), "Gate B"], env, capsys)
    assert resolved["conflict"] == conflict["id"] and resolved["value"] == "Gate B"
    assert isinstance(_doc(["server", "deadletters"], env, capsys), list)


def test_broker_passwd_and_config_show(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    env = {"WAYSTATION_BROKER__DATA_DIR": str(tmp_path / "broker")}
    doc = _doc(["broker", "passwd", "waystation-server"], env, capsys)
    assert doc["user"] == "waystation-server" and len(doc["password"]) >= 16
    assert doc["password_file"] == str(tmp_path / "broker" / "passwd")
    shown = _doc(["config", "show", "broker"], env, capsys)
    assert shown["config"]["data_dir"] == str(tmp_path / "broker")
