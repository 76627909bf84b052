"""A running agent daemon and the `creds` command (PROTOCOL.md §7.9), over a real
embedded broker with a scripted server: hostile commands (another device's password,
malformed, a replayed older rotation) are not reported done and change nothing; a
valid one is stored before it is reported; while the broker still refuses the new
password (Mosquitto before the switch) the daemon stays logged in with the old one, and
once the broker takes the new one it logs in with it and says so in `hello.cred`."""

from __future__ import annotations

import json
from typing import Any

import orjson

from agent.creds import FILE_NAME
from agent.daemon import AgentDaemon
from broker.embedded.passwords import write_password_entry
from tests.agent import test_daemon_catchup as kit
from tests.agent.test_daemon_catchup import DEV, UP, _send
from tests.fixtures_brokers import BrokerProcess
from tests.helpers import RecordingClient, wait_until

setup = kit.setup

NEW = "rotated-password-0123456789"


def _hellos(server: RecordingClient) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == "hello"]


def _creds(cid: str, **args: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"dev": DEV, "rotation": "r-2", "t": 2000, "password": NEW}
    return {"type": "command", "id": cid, "cmd": "creds", "args": {**base, **args}}


def _done(daemon: AgentDaemon, cid: str) -> bool:
    return daemon.sync.command_done(cid)


def test_hostile_creds_commands_change_nothing(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """Another device's password, a malformed one, a replay of an older rotation: not
    reported done, no hello in answer (the server would resend at once), no file."""
    daemon, server = setup
    wait_until(lambda: _hellos(server), 10, message="first hello")
    path = daemon.creds.path
    for cid, args in [("c-other", {"dev": "van-99"}), ("c-short", {"password": "x"}),
                      ("c-noid", {"rotation": "bad id!"}), ("c-float", {"t": 1.5})]:
        _send(server, _creds(cid, **args))
    _send(server, {"type": "command", "id": "c-ping", "cmd": "ping"})  # a marker
    wait_until(lambda: _done(daemon, "c-ping"), 10, message="ping done")
    assert not any(_done(daemon, c) for c in ("c-other", "c-short", "c-noid", "c-float"))
    assert not path.exists() and daemon.creds.pending_rotation is None

    _send(server, _creds("c-good"))
    wait_until(lambda: _done(daemon, "c-good"), 10, message="creds done")
    assert json.loads(path.read_text())["pending"][0]["id"] == "r-2"
    _send(server, _creds("c-replay", rotation="r-1", t=1000, password="older-password-000000"))
    _send(server, {"type": "command", "id": "c-ping2", "cmd": "ping"})
    wait_until(lambda: _done(daemon, "c-ping2"), 10, message="second ping done")
    assert not _done(daemon, "c-replay")
    assert [s["pw"] for s in json.loads(path.read_text())["pending"]] == [NEW]
    assert daemon.creds.pending_rotation == "r-2"


def test_falls_back_until_the_broker_takes_the_new_password(
        setup: tuple[AgentDaemon, RecordingClient], broker: BrokerProcess) -> None:
    """The broker does not know the new password yet: the relogin is refused and the
    daemon is back online with the old one (no hello.cred); once the password file has
    the new one, a later relogin uses it and hello.cred names the rotation."""
    daemon, server = setup
    wait_until(lambda: _hellos(server), 10, message="first hello")
    connects = daemon.stats.connects
    _send(server, _creds("c-1"))
    wait_until(lambda: _done(daemon, "c-1"), 10, message="creds done")
    # The relogin with the new password is refused; the old one gets it back online.
    wait_until(lambda: daemon.stats.connects > connects and daemon.connected, 20,
               message="reconnected with the old password")
    assert daemon.creds.login_rotation is None
    assert all("cred" not in h for h in _hellos(server))
    write_password_entry(broker.password_file, DEV, NEW)  # the switch
    hello = wait_until(lambda: next((h for h in _hellos(server) if h.get("cred") == "r-2"),
                                    None), 30, message="a hello naming the rotation")
    assert "c-1" in hello["done"]
    stored = json.loads((daemon.creds.path.parent / FILE_NAME).read_text())
    assert stored["current"]["id"] == "r-2" and stored["pending"] == []
