"""The generated server login of the single-machine deployment: made once, 0600, never
over an operator's own login; `server run` uses it only when no password is configured."""

from __future__ import annotations

import stat
from pathlib import Path

from broker.cli.daemons import with_generated_login
from broker.embedded.passwords import read_password_file, verify_password, write_password_entry
from broker.embedded.server_login import ensure_server_login, server_password_file
from waystation.config import ServerConfig, load_config


def test_generated_once_and_private(tmp_path: Path) -> None:
    passwd, data = tmp_path / "passwd", tmp_path / "broker"
    made = ensure_server_login(passwd, data, ["waystation-server"])
    assert made == server_password_file(data)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    password = made.read_text(encoding="utf-8").strip()
    assert len(password) >= 24
    assert verify_password(read_password_file(passwd)["waystation-server"], password)
    assert ensure_server_login(passwd, data, ["waystation-server"]) is None
    assert made.read_text(encoding="utf-8").strip() == password


def test_an_operators_login_is_kept(tmp_path: Path) -> None:
    passwd, data = tmp_path / "passwd", tmp_path / "broker"
    write_password_entry(passwd, "waystation-server", "chosen-by-operator")
    assert ensure_server_login(passwd, data, ["waystation-server"]) is None
    assert not server_password_file(data).exists()
    assert verify_password(read_password_file(passwd)["waystation-server"], "chosen-by-operator")


def test_a_lost_login_is_restored_from_the_kept_password(tmp_path: Path) -> None:
    """The password file was replaced (e.g. restored): the server's kept password is put
    back instead of a new one, so a running server's login stays valid."""
    passwd, data = tmp_path / "passwd", tmp_path / "broker"
    ensure_server_login(passwd, data, ["waystation-server"])
    password = server_password_file(data).read_text(encoding="utf-8").strip()
    passwd.write_text("", encoding="utf-8")
    ensure_server_login(passwd, data, ["waystation-server"])
    assert verify_password(read_password_file(passwd)["waystation-server"], password)


def test_server_uses_it_only_without_a_configured_password(tmp_path: Path) -> None:
    broker_dir = tmp_path / "broker"
    env = {"WAYSTATION_BROKER__DATA_DIR": str(broker_dir)}
    config = load_config(ServerConfig, None, env)
    assert with_generated_login(config, env) == config  # nothing generated yet
    ensure_server_login(broker_dir / "passwd", broker_dir, ["waystation-server"])
    used = with_generated_login(config, env)
    assert used.mqtt.password_file == server_password_file(broker_dir)
    assert used.mqtt.resolved_password(env) == server_password_file(broker_dir).read_text(
        encoding="utf-8").strip()
    own = load_config(ServerConfig, None, {**env, "WAYSTATION_SERVER__MQTT__PASSWORD": "x" * 9})
    assert with_generated_login(own, env) == own
