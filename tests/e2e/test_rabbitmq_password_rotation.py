"""Broker password rotation on a RabbitMQ fleet (issue 10 §4), with real processes: one
RabbitMQ node (rotation does not depend on clustering; `test_rabbitmq_cluster.py` covers
node loss), a merge server over AMQP with `enrol.broker_kind = "rabbitmq"` and no
password file in its config, PostgreSQL, two real agents.

What must hold: the device is rotated while online and keeps syncing; the switch (the
import of the new hash into RabbitMQ) fails at first and is retried at every tick, shown
in `device list`, `server status` and the server's log, and until it works the old
password keeps working; once it works the old password is refused and the new one
accepted, the agent logs in with the new one without losing its session, and a later
definitions import from the enrolment files keeps the rotated password. A device
speaking protocol v1 only keeps syncing with its old password and is switched at the
operator's deadline. `device remove` deletes the device's RabbitMQ user the same way:
failing at first and retried, shown pending, then the login is refused."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.rabbit_fleet import RabbitFleet
from tests.helpers import RecordingClient
from tests.rabbitmq_cluster import RABBITMQ_BIN, RabbitCluster, running_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """One RabbitMQ node for the module."""
    yield from running_cluster(tmp_path_factory.mktemp("rabbit"), size=1)


class RotatingRabbitFleet(RabbitFleet):
    """RabbitFleet whose server rotates on RabbitMQ: `[enrol] broker_kind = "rabbitmq"`,
    no password_file, `rabbitmq_import` = a wrapper around the node's `rabbitmqctl
    import_definitions` that fails (as with the node unreachable) while `switch_broken`
    exists, and `rabbitmq_delete_user` = one around its `rabbitmqctl delete_user` that
    fails the same way while `delete_broken` exists."""

    def __init__(self, root: Path, cluster: RabbitCluster, pg_url: str) -> None:
        self.switch_broken = root / "switch-broken"
        self.import_script = root / "rabbit-import.sh"
        self.delete_broken = root / "delete-broken"
        self.delete_script = root / "rabbit-delete-user.sh"
        super().__init__(root, cluster, pg_url)

    def _write_server_config(self, server_id: str) -> None:
        self.node_orders[server_id] = [0]
        env = self.cluster.base_env()
        exports = " ".join(f"{k}={shlex.quote(env[k])}" for k in (
            "HOME", "RABBITMQ_CONF_ENV_FILE", "ERL_EPMD_PORT", "ERL_EPMD_ADDRESS",
            "RABBITMQ_CTL_ERL_ARGS"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.import_script.write_text(
            "#!/bin/sh\n"
            f"if [ -e {shlex.quote(str(self.switch_broken))} ]; then\n"
            "  echo 'Error: unable to perform an operation on node: nodedown' >&2\n"
            "  exit 69\n"
            "fi\n"
            f"export {exports}\n"
            f"exec {shlex.quote(str(RABBITMQ_BIN / 'rabbitmqctl'))} "
            f"-n {shlex.quote(self.cluster.nodes[0].name)} import_definitions --format json\n")
        self.import_script.chmod(0o755)
        self.delete_script.write_text(
            "#!/bin/sh\n"
            f"if [ -e {shlex.quote(str(self.delete_broken))} ]; then\n"
            "  echo 'Error: unable to perform an operation on node: nodedown' >&2\n"
            "  exit 69\n"
            "fi\n"
            f"export {exports}\n"
            f"exec {shlex.quote(str(RABBITMQ_BIN / 'rabbitmqctl'))} "
            f"-n {shlex.quote(self.cluster.nodes[0].name)} delete_user \"$1\"\n")
        self.delete_script.chmod(0o755)
        super()._write_server_config(server_id)
        path = self.server_configs[server_id]
        lines = [line for line in path.read_text().splitlines(keepends=True)
                 if not line.startswith("password_file = ") or "server.pw" in line]
        text = "".join(lines).replace(
            "[enrol]\n", "[enrol]\nbroker_kind = \"rabbitmq\"\n"
                         f"rabbitmq_import = {json.dumps([str(self.import_script)])}\n"
                         "rabbitmq_delete_user = "
                         f"{json.dumps([str(self.delete_script)])}\n")
        assert "broker_kind" in text and str(self.password_file) not in text
        path.write_text(text)


@pytest.fixture
def fleet(tmp_path: Path, cluster: RabbitCluster, pg_database: str
          ) -> Iterator[RotatingRabbitFleet]:
    with RotatingRabbitFleet(tmp_path, cluster, pg_database) as f:
        f.start()
        yield f


def _rotation(fleet: RabbitFleet, dev: str) -> dict[str, Any] | None:
    rows = json.loads(fleet.cli("device", "list", "--json", "--config",
                                str(fleet.server_config)).stdout)
    doc: dict[str, Any] | None = next(r for r in rows if r["id"] == dev)["password_rotation"]
    return doc


def _probe(fleet: RabbitFleet, dev: str, password: str) -> str:
    """A plain client's CONNACK for `dev`'s login (another client id: the agent stays)."""
    client = RecordingClient(fleet.port, f"probe-{secrets.token_hex(4)}", dev, password)
    try:
        return client.connect(timeout=10)
    finally:
        client.close()


def test_rotation_on_rabbitmq_with_a_failing_then_working_switch(
        fleet: RotatingRabbitFleet, cluster: RabbitCluster) -> None:
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"])
    fleet.start_agent("van-1")
    fleet.start_agent("van-2")
    old = fleet.passwords["van-1"]
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "notes": "before"})
    fleet.wait_drained("van-1")

    fleet.switch_broken.touch()
    doc = json.loads(fleet.cli("device", "rotate-password", "van-1", "--json", "--config",
                               str(fleet.server_config)).stdout)
    assert doc["device_speaks_creds"] is True and doc["broker_kind"] == "rabbitmq"
    assert doc["password_file"] is None
    new = doc["password"]
    assert new != old
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "notes": "during"})
    fleet.agent("van-2").put("tasks", "t-3", {"route": "route-1", "notes": "from van-2"})

    # Stored by the device; the switch fails at every tick and says so everywhere.
    rot = fleet.wait(lambda: (r if (r := _rotation(fleet, "van-1")) and r["failing"] else None),
                     timeout=60, what="a failing switch in device list")
    assert rot["stage"] == "stored" and "nodedown" in rot["failing"]["error"]
    failed = fleet.server.wait_event("password_rotation_step_failed", timeout=30)
    assert failed["dev"] == "van-1" and failed["step"] == "switch"
    status = json.loads(fleet.cli("server", "status", "--json", "--config",
                                  str(fleet.server_config)).stdout)
    assert status["password_rotations"]["van-1"]["failing"]["error"] == rot["failing"]["error"]
    text = fleet.cli("server", "status", "--config", str(fleet.server_config)).stdout
    assert "van-1 (stored, next step failed at" in text
    # Meanwhile RabbitMQ has the old password only, and the device syncs with it.
    assert _probe(fleet, "van-1", old) == "Success"
    assert _probe(fleet, "van-1", new) != "Success"
    fleet.wait_converged("van-1", "van-2")
    assert fleet.value("tasks", "t-2", "notes") == "during"

    # The import works again: switched at a tick, then the agent's re-login with the new
    # password retires the rotation.
    os.unlink(fleet.switch_broken)
    rot = fleet.wait(lambda: (r if (r := _rotation(fleet, "van-1")) and r["stage"] == "retired"
                              else None), timeout=120, what="rotation retired")
    assert rot["retired_by"] == "login" and rot["switched"] and rot["failing"] is None
    assert _probe(fleet, "van-1", new) == "Success"
    assert _probe(fleet, "van-1", old) != "Success"
    fleet.agent("van-2").put("tasks", "t-4", {"route": "route-1", "notes": "after switch"})
    fleet.agent("van-1").put("tasks", "t-5", {"route": "route-1", "notes": "new login"})
    fleet.wait_converged("van-1", "van-2")
    assert fleet.value("tasks", "t-5", "notes") == "new login"
    connects = fleet.agents["van-1"].events("connected")
    assert len(connects) >= 2 and all(c["session_present"] for c in connects[1:]), connects
    events = [e["event"] for e in fleet.agents["van-1"].events()]
    assert "broker_password_received" in events and "broker_password_rotated" in events

    # A later import built from the enrolment passwords keeps the rotated one (the
    # store holds it), and van-2's enrolment password still works.
    enrolled = fleet.root / "enrolled"
    enrolled.mkdir()
    for dev in ("van-1", "van-2"):
        (enrolled / f"{dev}.mqtt-password").write_text(fleet.passwords[dev] + "\n")
    server_pw = fleet.root / "server.pw"
    made = subprocess.run(
        [sys.executable, "-m", "broker.rabbitmq.definitions", "--server-password-file",
         str(server_pw), "--device-passwords", str(enrolled), "--server-config",
         str(fleet.server_config)], cwd=REPO, capture_output=True, text=True, timeout=60,
        check=False)
    assert made.returncode == 0, made.stderr
    cluster.import_definitions(json.loads(made.stdout))
    assert _probe(fleet, "van-1", old) != "Success"
    assert _probe(fleet, "van-1", new) == "Success"
    assert _probe(fleet, "van-2", fleet.passwords["van-2"]) == "Success"

    # A restarted agent (its config still says the old password) logs in with the new.
    assert fleet.stop_agent("van-1") == 0
    fleet.start_agent("van-1")
    fleet.agent("van-2").put("tasks", "t-6", {"route": "route-1", "notes": "after restart"})
    fleet.wait_converged("van-1", "van-2")


def test_a_v1_device_keeps_syncing_and_is_switched_at_the_deadline(
        fleet: RotatingRabbitFleet) -> None:
    """A device speaking protocol v1 only (no capabilities) is never sent the password and
    syncs on with its old one; at --retire-after the server switches RabbitMQ to the new
    one (the operator's, printed by the CLI), which then logs it in, the old one no more."""
    from tests.e2e.protocol_device import ProtocolDevice

    fleet.add_device("pd-1", ["route-1"])
    fleet.sync_logins()
    old = fleet.passwords["pd-1"]
    doc = json.loads(fleet.cli("device", "rotate-password", "pd-1", "--json",
                               "--retire-after", "8s", "--config",
                               str(fleet.server_config)).stdout)
    assert doc["device_speaks_creds"] is False and doc["password"]
    pd = ProtocolDevice("pd-1", old, port=fleet.port, scopes=["route-1"])
    try:
        assert pd.connect() == "Success"
        pd.hello()
        ch = pd.change("tasks", "t-1", "route-1", f={"route": "route-1", "notes": "v1"})
        pd.send_changes([ch])
        pd.wait_acked([ch["n"]])
        assert [m for m in pd.messages if m.get("type") == "command"] == []
    finally:
        pd.close()
    assert _rotation(fleet, "pd-1")["stage"] == "sent"  # type: ignore[index]
    rot = fleet.wait(lambda: (r if (r := _rotation(fleet, "pd-1")) and r["stage"] == "retired"
                              else None), timeout=60, what="deadline")
    assert rot["retired_by"] == "deadline" and rot["switched"]
    assert _probe(fleet, "pd-1", old) != "Success"
    pd = ProtocolDevice("pd-1", doc["password"], port=fleet.port, scopes=["route-1"])
    pd.next_n = 2
    try:
        assert pd.connect() == "Success"
        pd.hello()
        ch = pd.change("tasks", "t-2", "route-1", f={"route": "route-1", "notes": "by hand"})
        pd.send_changes([ch])
        pd.wait_acked([ch["n"]])
    finally:
        pd.close()


def test_remove_deletes_the_rabbitmq_user_retrying_while_it_fails(
        fleet: RotatingRabbitFleet) -> None:
    """`device remove` on a RabbitMQ fleet revokes the login: the running server deletes
    the device's RabbitMQ user; while the deletion fails it is retried, logged and shown
    pending (server status, device list) and the login still works; then it is gone."""
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"])
    fleet.start_agent("van-2")
    password = fleet.passwords["van-1"]
    assert _probe(fleet, "van-1", password) == "Success"

    fleet.delete_broken.touch()
    doc = json.loads(fleet.cli("device", "remove", "van-1", "--json", "--config",
                               str(fleet.server_config)).stdout)
    assert doc["login_removal_queued"] is True
    failed = fleet.server.wait_event("device_login_removal_failed", timeout=60)
    assert failed["dev"] == "van-1" and "nodedown" in failed["error"]
    status = json.loads(fleet.cli("server", "status", "--json", "--config",
                                  str(fleet.server_config)).stdout)
    assert "nodedown" in status["login_removals"]["van-1"]["failing"]["error"]
    listed = fleet.cli("device", "list", "--config", str(fleet.server_config)).stdout
    assert "broker login deletion pending" in listed and "nodedown" in listed
    assert _probe(fleet, "van-1", password) == "Success"  # not deleted yet

    os.unlink(fleet.delete_broken)
    fleet.server.wait_event("device_login_removed", timeout=60,
                            where=lambda e: e.get("dev") == "van-1")
    assert _probe(fleet, "van-1", password) != "Success"
    status = json.loads(fleet.cli("server", "status", "--json", "--config",
                                  str(fleet.server_config)).stdout)
    assert status["login_removals"] == {}
    fleet.agent("van-2").put("tasks", "t-1", {"route": "route-1", "notes": "still here"})
    fleet.wait_drained("van-2")
