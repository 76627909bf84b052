"""`server get` and `server list` as an operator reads them: after `server resolve` the
field's writer is the operator's resolve, not a "change 0" of a device named "~server";
the "more:" line of a page can be pasted as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.server.store import open_store
from tests.server.helpers import T0, changes, hp, make_engine, task
from waystation.cli import main
from waystation.config import ServerConfig, load_config


def test_get_names_an_operator_resolution(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "passwd")}
    store = open_store(load_config(ServerConfig, None, env))
    engine, store, _ = make_engine(tmp_path / "server", {"van-1": ["r1"], "van-2": ["r1"]},
                                   store=store)
    try:
        engine.handle_up("van-1", changes("van-1", [task(1, "t-1", address="Dock 1")]))
        engine.handle_up("van-2", changes("van-2", [task(1, "t-1", h=hp(T0 + 5),
                                                         create=False, address="Dock 2")]))
        engine.tick()
    finally:
        store.close()
    capsys.readouterr()
    assert main(["server", "conflicts", "--json"], env=env) == 0
    (conflict,) = json.loads(capsys.readouterr().out)
    assert main(["server", "resolve", str(conflict["id"]), '"Dock 4"'], env=env) == 0
    capsys.readouterr()
    assert main(["server", "get", "tasks", "t-1"], env=env) == 0
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if "address" in ln]
    assert '"Dock 4"' in line and "set by the server (an operator's resolve) at " in line
    assert "~server" not in line and "change 0" not in line
    # The route, written by a device, still names it and its change.
    assert main(["server", "get", "tasks", "t-1"], env=env) == 0
    assert "by van-1 change 1 at " in capsys.readouterr().out


def test_list_says_how_to_go_on_with_the_same_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "passwd")}
    store = open_store(load_config(ServerConfig, None, env))
    engine, store, _ = make_engine(tmp_path / "server", {"van-1": ["r1"]}, store=store)
    try:
        engine.handle_up("van-1", changes("van-1", [task(n, f"t-{n}") for n in (1, 2, 3)]))
        engine.tick()
    finally:
        store.close()
    capsys.readouterr()
    argv = ["server", "list", "tasks", "--scope", "r1", "--limit", "1", "--deleted"]
    seen = []
    while True:
        assert main([*argv, "--json"], env=env) == 0
        seen += [r["key"] for r in json.loads(capsys.readouterr().out)["records"]]
        assert main(argv, env=env) == 0
        last = capsys.readouterr().out.splitlines()[-1]
        if not last.startswith("more: "):
            break
        # The hint is pasted as is: the same options, inside the quotes.
        pasted = last.removeprefix("more: `").removesuffix("`").split()
        assert pasted[0] == "waystation" and {"--scope", "--limit", "--deleted"} <= set(pasted)
        argv = pasted[1:]
    assert seen == ["t-1", "t-2", "t-3"]
