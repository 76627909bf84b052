"""The embedded single-machine deployment: `broker run` + `server run` with no config
files agree on a generated server login, and a device enrolled with `device add` syncs.
Real processes, the embedded broker over TCP, the LMDB store; SIGINT exits 130."""

from __future__ import annotations

import signal
import stat
from pathlib import Path

from broker.embedded.passwords import read_password_file, verify_password
from tests.cli.procs import Proc, clean_env, run_cli, run_json
from tests.helpers import free_port, wait_until
from waystation.cli.exitcodes import EXIT_INTERRUPTED, EXIT_OK, EXIT_STORE


def test_no_config_broker_and_server_agree_and_a_device_syncs(tmp_path: Path) -> None:
    """No config file anywhere: only the port is moved off 1883 (the machine is shared),
    by environment; every other setting is the built-in default, data in ./waystation-data."""
    port = free_port()
    env = clean_env({"WAYSTATION_BROKER__PORT": str(port),
                     "WAYSTATION_SERVER__MQTT__PORT": str(port)})
    broker = Proc(tmp_path, env, "broker", "broker", "run")
    server: Proc | None = None
    agent: Proc | None = None
    try:
        broker.wait_log("embedded broker ready")
        secret = tmp_path / "waystation-data" / "broker" / "server-password"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        password = secret.read_text(encoding="utf-8").strip()
        logins = read_password_file(tmp_path / "waystation-data" / "broker" / "passwd")
        assert verify_password(logins["waystation-server"], password)

        server = Proc(tmp_path, env, "server", "server", "run")
        server.wait_log("server_connected")
        assert "Not authorized" not in server.text()

        # A second `server run` in the same directory (the same id, the same store) is
        # refused at once, naming the running one; before, the two took each other's
        # MQTT session over and over, both writing the one liveness row.
        twin = run_cli(tmp_path, env, "server", "run", timeout=30)
        assert twin.returncode == EXIT_STORE, twin.stderr
        assert (f"error: merge server server-1 is already running on this host (PID "
                f"{server.popen.pid}, started ") in twin.stderr
        assert "Traceback" not in twin.stderr

        added = run_cli(tmp_path, env, "device", "add", "van-1", "--scope", "route-1",
                        "--out", "van-1")
        assert added.returncode == 0, added.stderr
        agent = Proc(tmp_path, env, "agent", "agent", "run", "--config", "van-1/van-1.toml")
        put = run_cli(tmp_path, env, "agent", "put", "--config", "van-1/van-1.toml",
                      "tasks", "t-1", "route=route-1", "status=out")
        assert put.returncode == 0, put.stderr

        def synced() -> bool:
            return bool(run_json(tmp_path, env, "server", "status")["records"] == 1)

        wait_until(synced, 60, interval=0.5, message=lambda: "the record on the server:\n"
                   + server.text()[-2000:] + agent.text()[-2000:])  # type: ignore[union-attr]
        status = run_json(tmp_path, env, "agent", "status", "--config", "van-1/van-1.toml")
        wait_until(lambda: run_json(tmp_path, env, "agent", "status", "--config",
                                    "van-1/van-1.toml")["pending"] == 0, 60, interval=0.5)
        assert status["device_id"] == "van-1"

        server.popen.send_signal(signal.SIGINT)
        assert server.wait_exit() == EXIT_INTERRUPTED
        broker.popen.send_signal(signal.SIGTERM)
        assert broker.wait_exit() == EXIT_OK
    finally:
        for proc in (agent, server, broker):
            if proc is not None:
                proc.close()


def test_a_restarted_broker_keeps_the_generated_login(tmp_path: Path) -> None:
    """The second start finds the login and generates nothing; SIGINT exits 130."""
    port = free_port()
    env = clean_env({"WAYSTATION_BROKER__PORT": str(port)})
    secret = tmp_path / "waystation-data" / "broker" / "server-password"
    first = Proc(tmp_path, env, "broker-1", "broker", "run")
    try:
        first.wait_log("embedded broker ready")
        password = secret.read_text(encoding="utf-8")
        first.popen.send_signal(signal.SIGINT)
        assert first.wait_exit() == EXIT_INTERRUPTED
    finally:
        first.close()
    second = Proc(tmp_path, env, "broker-2", "broker", "run")
    try:
        second.wait_log("embedded broker ready")
        assert "server_login_generated" not in second.text()
        assert secret.read_text(encoding="utf-8") == password
        second.popen.send_signal(signal.SIGINT)
        assert second.wait_exit() == EXIT_INTERRUPTED
    finally:
        second.close()


def test_a_server_started_before_the_broker_logs_in_once_the_broker_runs(
        tmp_path: Path) -> None:
    """The newcomer's wrong order (`server run &` first): the server warns that no login
    exists yet, and logs in with the one `broker run` then generates, with no restart.
    Before, it read the file once at start and was refused until restarted."""
    port = free_port()
    env = clean_env({"WAYSTATION_BROKER__PORT": str(port),
                     "WAYSTATION_SERVER__MQTT__PORT": str(port)})
    server = Proc(tmp_path, env, "server", "server", "run")
    broker: Proc | None = None
    try:
        server.wait_log("server_password_missing")
        server.wait_log("mqtt connection attempt failed")  # no broker yet
        broker = Proc(tmp_path, env, "broker", "broker", "run")
        broker.wait_log("embedded broker ready")
        server.wait_log("server_connected", timeout=60)
        assert "server_password_generated_used" in server.text()
    finally:
        for proc in (server, broker):
            if proc is not None:
                proc.close()
