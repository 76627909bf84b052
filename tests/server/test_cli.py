"""Operator commands: device enrolment and the server's inspection and resolve commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from broker.cli.conflicts import cmd_server_conflicts
from broker.cli.deadletters import cmd_server_deadletters
from broker.embedded.passwords import read_password_file, verify_password
from broker.server.store import open_store
from broker.server.store.base import DeadLetter, ServerRow, Store
from tests.server.helpers import CATALOG, T0, changes, hp, make_engine, status, task
from waystation.cli import main
from waystation.cli.output import iso
from waystation.config import AgentConfig, ServerConfig, load_config


@pytest.fixture
def env(server_cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment, on an LMDB store and on a fresh PostgreSQL database."""
    return server_cli_env


def _open(env: dict[str, str]) -> Store:
    """The store the CLI opens with `env`."""
    return open_store(load_config(ServerConfig, None, env))


def run(env: dict[str, str], *argv: str,
        capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv), env=env)
    out = capsys.readouterr()
    return code, out.out, out.err


def _seed(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """A store with two devices, a manual conflict and a dead letter (server closed after)."""
    data = Path(env["WAYSTATION_SERVER__DATA_DIR"])
    engine, store, _ = make_engine(data, {"van-1": ["r1"], "van-2": ["r1", "r2"]},
                                   store=_open(env))
    try:
        engine.handle_status("van-1", status("van-1"))
        engine.handle_up("van-1", changes("van-1", [task(1, "t-1", address="Dock 1")]))
        engine.handle_up("van-2", changes("van-2", [task(1, "t-1", h=hp(T0 + 5), create=False,
                                                         address="Dock 2")]))
        engine.handle_up("van-2", b"not json")
        engine.tick()
    finally:
        store.close()
    capsys.readouterr()  # drop the engine's log lines


def test_device_add_writes_registry_credentials_and_agent_config(
        env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`device add` registers the device, adds its broker login and a usable agent config."""
    code, out, err = run(env, "device", "add", "van-7", "--scope", "r1", "--scope", "r2",
                         "--out", str(tmp_path / "out"), capsys=capsys)
    assert code == 0, err
    assert "van-7 registered" in out
    agent_file = tmp_path / "out" / "van-7.toml"
    assert stat.S_IMODE(agent_file.stat().st_mode) == 0o600
    agent = load_config(AgentConfig, agent_file, {})
    assert agent.device_id == "van-7" and agent.scopes == ["r1", "r2"]
    password = agent.mqtt.resolved_password({})
    assert password and verify_password(read_password_file(tmp_path / "passwd")["van-7"],
                                        password)
    code, out, _ = run(env, "device", "list", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)[0]["scopes"] == ["r1", "r2"]


def test_device_add_refuses_bad_input(env: dict[str, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Duplicates, bad scopes and an existing config file fail with one-line errors."""
    out_dir = str(tmp_path / "out")
    assert run(env, "device", "add", "van-1", "--scope", "r1", "--out", out_dir,
               capsys=capsys)[0] == 0
    code, _, err = run(env, "device", "add", "van-1", "--scope", "r1", "--out",
                       str(tmp_path / "o2"), capsys=capsys)
    assert code != 0 and err.count("\n") == 1 and "already registered" in err
    code, _, err = run(env, "device", "add", "van-2", "--scope", "bad scope!", "--out",
                       out_dir, capsys=capsys)
    assert code == 2 and "not a valid scope" in err
    (tmp_path / "out" / "van-3.toml").write_text("keep me")
    code, _, err = run(env, "device", "add", "van-3", "--scope", "r1", "--out", out_dir,
                       capsys=capsys)
    assert code != 0 and "already exists" in err
    code, out, _ = run(env, "device", "list", capsys=capsys)
    assert "van-1" in out and "van-2" not in out and "van-3" not in out


def test_server_status_shows_dead_letters_against_their_bounds(
        env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """`server status` shows the dead letters kept, their bytes, the truncated ones and
    what the configured bounds dropped (text and JSON)."""
    env = {**env, "WAYSTATION_SERVER__DEAD_LETTERS__MAX_COUNT": "100"}
    store = _open(env)
    try:
        big = b"x" * 70_000
        for i in range(105):
            store.transact(lambda t, i=i: t.add_dead_letter(
                DeadLetter(0, T0 + i, "van-1", "up", "malformed", "bad", big)))
    finally:
        store.close()
    code, out, _ = run(env, "server", "status", "--json", capsys=capsys)
    doc = json.loads(out)["dead_letter_store"]
    assert code == 0 and (doc["count"], doc["truncated"], doc["dropped"]) == (100, 100, 5)
    assert doc["max_count"] == 100 and doc["bytes"] > 100 * 65536
    assert doc["oldest"] == iso(T0 + 5)
    code, out, _ = run(env, "server", "status", capsys=capsys)
    assert "dead letters kept: 100 of at most 100" in out
    assert "100 with their raw payload cut" in out and "dropped by the bounds: 5" in out


def test_a_command_the_device_has_not_said_it_speaks_is_said_to_wait(
        env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`device sync` of a device whose last hello did not offer `sync` (an older agent):
    the server keeps the command pending, so "sent at once if online" is not all."""
    run(env, "device", "add", "van-9", "--scope", "r1", "--out", str(tmp_path / "o"),
        capsys=capsys)
    code, out, _ = run(env, "device", "sync", "van-9", capsys=capsys)
    assert code == 0 and "note: van-9 has not said it understands `sync`" in out
    assert "waits until it does" in out
    code, out, _ = run(env, "device", "resync", "van-9", capsys=capsys)  # needs no capability
    assert code == 0 and "note:" not in out
    store = _open(env)
    try:  # its agent said hello with `sync` in its caps, as message_apply records it
        store.transact(lambda txn: txn.put_device(
            dataclasses.replace(txn.get_device("van-9"), caps=("sync",))))
    finally:
        store.close()
    code, out, _ = run(env, "device", "sync", "van-9", capsys=capsys)
    assert code == 0 and "note:" not in out


def test_device_remove(env: dict[str, str], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """`device remove` revokes the registry entry and the broker login; unknown ids fail."""
    run(env, "device", "add", "van-1", "--scope", "r1", "--out", str(tmp_path), capsys=capsys)
    code, out, _ = run(env, "device", "remove", "van-1", capsys=capsys)
    assert code == 0 and "broker login was removed" in out
    assert "van-1" not in read_password_file(tmp_path / "passwd")
    code, _, err = run(env, "device", "remove", "van-1", capsys=capsys)
    assert code == 1 and "not registered" in err
    assert "no devices registered" in run(env, "device", "list", capsys=capsys)[1]


def test_server_status_and_devices(env: dict[str, str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`server status` and `server devices` report devices, sequences and counters."""
    _seed(env, capsys)
    code, out, _ = run(env, "server", "status", "--json", capsys=capsys)
    doc = json.loads(out)
    assert code == 0
    assert doc["store"]["kind"] == env.get("WAYSTATION_SERVER__STORE__KIND", "lmdb")
    assert doc["devices"] == {"known": 2, "enabled": 2, "online": 1, "never_connected": 0,
                              "with_dead_letters": {}, "clock_off": {}}
    assert doc["scopes"] == {"r1": {"seq": 2, "purged_to": 0}}
    assert doc["open_conflicts"] == 1 and doc["dead_letters"] == 1
    assert doc["schema"]["version"] == CATALOG.version
    code, out, _ = run(env, "server", "status", capsys=capsys)
    assert "2 known" in out and "1 online (van-1)" in out and "r1" in out
    code, out, _ = run(env, "server", "devices", capsys=capsys)
    assert code == 0 and "van-1" in out and "online" in out
    devices = json.loads(run(env, "server", "devices", "--json", capsys=capsys)[1])
    assert [d["online"] for d in devices] == [True, False]


def test_server_status_counts_devices_that_never_connected(
        env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A device enrolled and never heard from is named on the devices line (a fresh
    rollout's first question), and counted in JSON; one that connected is not."""
    _seed(env, capsys)
    code, _, err = run(env, "device", "add", "van-7", "--scope", "r1",
                       "--out", str(tmp_path / "out"), capsys=capsys)
    assert code == 0, err
    doc = json.loads(run(env, "server", "status", "--json", capsys=capsys)[1])
    assert doc["devices"]["known"] == 3 and doc["devices"]["never_connected"] == 1
    text = run(env, "server", "status", capsys=capsys)[1]
    assert "1 never connected (van-7)" in text
    # ... with where to look: the device knows why (the server heard nothing from it)
    assert "never connected (van-7): `waystation agent status` on each says why" in text
    devices = run(env, "server", "devices", capsys=capsys)[1]
    assert next(ln for ln in devices.splitlines() if ln.startswith("van-7")).split()[1:3] == [
        "never", "connected"]


def test_server_status_tells_running_stopped_and_gone_servers(
        env: dict[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`server status` / `server devices` say which merge servers run; with none running
    (stopped cleanly, or not seen past the threshold: crashed) they say so plainly and
    mark the stored presence as not live (text and JSON)."""
    _seed(env, capsys)
    store = _open(env)
    try:
        with store.read() as txn:
            (row,) = txn.servers()  # the seeding engine's tick recorded it
    finally:
        store.close()
    assert (row.id, row.group, row.stopped_ms) == ("server-1", "main", 0)
    clock = [row.seen_ms + 2_000]
    monkeypatch.setattr("broker.cli.status.now_ms", lambda: clock[0])

    def status() -> tuple[dict[str, Any], str, str]:
        doc = json.loads(run(env, "server", "status", "--json", capsys=capsys)[1])
        text = run(env, "server", "status", capsys=capsys)[1]
        return doc, text, run(env, "server", "devices", capsys=capsys)[1]

    doc, text, devices = status()  # running
    assert doc["server_running"] and doc["presence_as_of"] is None
    assert doc["servers"][0]["state"] == "running" and doc["servers"][0]["seen_s_ago"] == 2
    assert "merge server server-1 (group main, " in text and "running (seen 2s ago" in text
    assert "NO MERGE SERVER" not in text + devices and "online?" not in devices
    assert "1 online (van-1)\n" in text
    listed = json.loads(run(env, "server", "devices", "--json", capsys=capsys)[1])
    assert [d["presence_as_of"] for d in listed] == [None, None]

    clock[0] = row.seen_ms + 31_000  # past the 30 s threshold, never stopped: gone
    doc, text, devices = status()
    assert not doc["server_running"] and doc["presence_as_of"] == iso(row.seen_ms)
    assert doc["servers"][0]["state"] == "gone" and doc["stale_after_s"] == 30
    assert "not seen for 31 s" in text and "did not stop cleanly: crashed" in text
    for out in (text, devices):
        assert "NO MERGE SERVER IS RUNNING" in out and "waystation server run" in out
        assert f"as of {iso(row.seen_ms)}" in out and "systemctl start waystation-server" in out
    assert "1 online (van-1) as the last server left them, not live" in text
    assert f"online? (as of {iso(row.seen_ms)})" in devices
    listed = json.loads(run(env, "server", "devices", "--json", capsys=capsys)[1])
    assert [d["presence_as_of"] for d in listed] == [iso(row.seen_ms)] * 2
    # a longer threshold counts it as running still
    doc = json.loads(run(env, "server", "status", "--json", "--stale-after", "60",
                         capsys=capsys)[1])
    assert doc["server_running"] and doc["stale_after_s"] == 60

    store = _open(env)
    try:
        store.transact(lambda t: t.put_server(ServerRow(
            row.id, row.group, row.version, row.started_ms, row.seen_ms + 1_000,
            stopped_ms=row.seen_ms + 1_000)))
    finally:
        store.close()
    clock[0] = row.seen_ms + 2_000  # stopped cleanly a second ago: not running
    doc, text, devices = status()
    assert not doc["server_running"] and doc["servers"][0]["state"] == "stopped"
    assert f"stopped cleanly at {iso(row.seen_ms + 1_000)}" in text
    assert "NO MERGE SERVER IS RUNNING" in text and "online?" in devices


def test_server_forget_drops_a_retired_server_but_not_a_running_one(
        env: dict[str, str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`server forget`: refused for a running server and for an unknown id (the store
    untouched); once the server is gone it is dropped from `server status`."""
    _seed(env, capsys)
    store = _open(env)
    try:
        with store.read() as txn:
            (row,) = txn.servers()
    finally:
        store.close()
    clock = [row.seen_ms + 2_000]
    monkeypatch.setattr("broker.cli.servers.now_ms", lambda: clock[0])
    monkeypatch.setattr("broker.cli.status.now_ms", lambda: clock[0])
    code, out, err = run(env, "server", "forget", "server-1", capsys=capsys)
    # a refusal (exit 1, as the operator guide's exit codes say), not a usage error (2)
    assert code == 1 and "server-1 is running" in err and "stop it first" in err
    assert "crashed counts as gone once not seen for 30 s" in err  # a killed one: wait
    code, out, err = run(env, "server", "forget", "server-9", capsys=capsys)
    assert code == 1 and "no merge server 'server-9'" in err and "server-1" in err
    doc = json.loads(run(env, "server", "status", "--json", capsys=capsys)[1])
    assert [s["id"] for s in doc["servers"]] == ["server-1"]

    clock[0] = row.seen_ms + 600_000  # ten minutes unseen: gone
    code, out, err = run(env, "server", "forget", "server-1", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["forgotten"]["state"] == "gone"
    doc = json.loads(run(env, "server", "status", "--json", capsys=capsys)[1])
    assert doc["servers"] == [] and not doc["server_running"]
    # the warning names the forget, not only a server started before the upgrade
    assert "`waystation server forget` dropped them" in run(env, "server", "status",
                                                             capsys=capsys)[1]


def test_server_status_without_any_server_recorded(
        env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """A store no server ever recorded itself in: not running, presence time unknown."""
    _open(env).close()
    doc = json.loads(run(env, "server", "status", "--json", capsys=capsys)[1])
    assert (doc["server_running"], doc["servers"], doc["presence_as_of"]) == (False, [], None)
    text = run(env, "server", "status", capsys=capsys)[1]
    assert "NO MERGE SERVER IS RUNNING (no merge server has recorded itself" in text


def test_server_conflicts_and_resolve(env: dict[str, str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Open conflicts are listed; resolve settles one; bad ids and values are refused."""
    _seed(env, capsys)
    code, out, _ = run(env, "server", "conflicts", "--json", capsys=capsys)
    (conflict,) = json.loads(out)
    assert conflict["field"] == "address" and conflict["open"]
    assert "Dock 2" in run(env, "server", "conflicts", capsys=capsys)[1]
    code, _, err = run(env, "server", "resolve", str(conflict["id"]), "42", capsys=capsys)
    assert code == 2 and "expected a string" in err
    code, _, err = run(env, "server", "resolve", "abc", "x", capsys=capsys)
    assert code == 2 and "not a conflict id" in err
    code, _, err = run(env, "server", "resolve", "999", "x", capsys=capsys)
    assert code == 1 and "no conflict with id 999" in err
    code, out, _ = run(env, "server", "resolve", str(conflict["id"]), "Gate B", capsys=capsys)
    assert code == 0 and '"Gate B"' in out
    assert "no open conflicts" in run(env, "server", "conflicts", capsys=capsys)[1]
    code, _, err = run(env, "server", "resolve", str(conflict["id"]), "x", capsys=capsys)
    assert code == 1 and "already resolved" in err


def _ns(env: dict[str, str], **kw: Any) -> argparse.Namespace:
    return argparse.Namespace(config=None, json=True, **kw)


def test_conflicts_all_and_deadletters_limit(env: dict[str, str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--all lists closed conflicts too; deadletters honours --limit and shows raw bytes."""
    _seed(env, capsys)
    assert cmd_server_conflicts(_ns(env, all=True), env) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    assert cmd_server_deadletters(_ns(env, limit=5), env) == 0
    (letter,) = json.loads(capsys.readouterr().out)
    assert letter["code"] == "malformed" and letter["raw"] == "not json"
    assert letter["device"] == "van-2"
    code, out, _ = run(env, "server", "deadletters", capsys=capsys)
    assert code == 0 and "malformed" in out


def test_conflicts_all_and_deadletters_limit_from_the_command_line(
        env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """`server conflicts --all --limit N` and `server deadletters --limit N` parse and apply."""
    _seed(env, capsys)
    code, out, err = run(env, "server", "conflicts", "--all", "--limit", "5", "--json",
                         capsys=capsys)
    assert code == 0, err
    assert len(json.loads(out)) == 1
    code, out, err = run(env, "server", "deadletters", "--limit", "1", "--json", capsys=capsys)
    assert code == 0, err
    assert [d["code"] for d in json.loads(out)] == ["malformed"]
    code, _, err = run(env, "server", "deadletters", "--limit", "0", capsys=capsys)
    assert code == 2 and "--limit" in err


def test_no_server_running_names_the_config_to_start_it_with(
        env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`server status --config FILE` with no server running said "or `waystation server
    run`": typed as shown, that starts a server on ./waystation-data, another store than
    the one the command read. It names the --config given."""
    _open(env).close()
    config = tmp_path / "server.toml"
    config.write_text("# the store comes from the environment here\n")
    assert run(env, "device", "add", "van-1", "--scope", "r1", "--out", str(tmp_path / "o"),
               capsys=capsys)[0] == 0
    for command in ("status", "devices"):
        text = run(env, "server", command, "--config", str(config), capsys=capsys)[1]
        assert f"`waystation server run --config {config}`" in text, text
        assert "`waystation server run`" not in text
    # Without --config, the command read ./waystation-data: the bare command fits.
    assert "`waystation server run`" in run(env, "server", "status", capsys=capsys)[1]


@pytest.mark.parametrize("argv", [
    ["server", "status"], ["server", "devices"], ["server", "conflicts"],
    ["server", "deadletters"], ["server", "list", "tasks"], ["server", "get", "tasks", "t-1"],
    ["device", "list"], ["device", "disable", "van-1"], ["server", "forget", "server-1"],
])
def test_commands_about_the_fleet_refuse_a_store_that_is_not_there(
        tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Run without the server's --config, in another directory than the server's: the
    command says where it looked and what to give it, and creates nothing. Before, it
    created an empty store there and reported an empty fleet (`server status`: "NO
    MERGE SERVER IS RUNNING", `device list`: "no devices registered")."""
    data = tmp_path / "waystation-data" / "server"
    env = {"WAYSTATION_SERVER__DATA_DIR": str(data)}
    code, out, err = run(env, *argv, capsys=capsys)
    assert code == 3 and out == ""
    assert err.startswith(f"error: no server store at {data / 'store'}: give the config "
                          "the server runs with (`--config "), err
    assert not data.exists()


def test_schema_history_where_no_store_is_creates_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing is published where no store is; before, `schema history` created an
    empty store there, which every later command from that directory then read."""
    data = tmp_path / "waystation-data" / "server"
    env = {"WAYSTATION_SERVER__DATA_DIR": str(data)}
    code, out, _ = run(env, "schema", "history", capsys=capsys)
    assert code == 0 and out.startswith("no schema published yet (no server store at ")
    code, out, _ = run(env, "schema", "history", "--json", capsys=capsys)
    assert code == 0 and json.loads(out) == {"live": None, "versions": []}
    assert not data.exists()
