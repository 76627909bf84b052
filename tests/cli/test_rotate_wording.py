"""What `device rotate-password`, `device remove` and `device list` say must hold on
every broker that reads the password file: Mosquitto holds one password per user, so
"the old password still works" after the switch, or "the broker accepts both", is true
only of the embedded broker (deploy/README.md, "Rotating a device's broker password")."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from broker.server.rotation import Rotation
from waystation.cli import main


def test_rotate_password_names_which_broker_takes_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "passwd")}
    assert main(["device", "add", "van-1", "--scope", "r1", "--out", str(tmp_path / "o")],
                env=env) == 0
    capsys.readouterr()
    assert main(["device", "rotate-password", "van-1"], env=env) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "the embedded broker accepts its old and its new password" in first
    assert "Mosquitto takes the old one until the server switches" in first


def test_switched_does_not_claim_the_old_password_works() -> None:
    rot = Rotation(id="r-1", cmd="creds-1", t=1, new_hash="h", stored=2, switched=3)
    assert rot.stage == "switched"
    text = rot.describe()
    assert "old password still works" not in text
    assert "waiting for the device's login with the new password" in text
    assert dataclasses.replace(rot, retired=4).describe() == "password rotated"


def test_remove_says_mosquitto_must_reload(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The guide's `device remove` step: the login leaves the file; Mosquitto drops a
    connection the device holds only when it reads the file again."""
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "passwd")}
    assert main(["device", "add", "van-1", "--scope", "r1", "--out", str(tmp_path / "o")],
                env=env) == 0
    capsys.readouterr()
    assert main(["device", "remove", "van-1"], env=env) == 0
    out = capsys.readouterr().out
    assert f"its broker login was removed from {tmp_path / 'passwd'}" in out
    assert "reload" in out and "van-1:" not in (tmp_path / "passwd").read_text()


def _rotate_on(tmp_path: Path, capsys: pytest.CaptureFixture[str],
               extra: dict[str, str]) -> str:
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "passwd"), **extra}
    assert main(["device", "add", "van-1", "--scope", "r1", "--out", str(tmp_path / "o")],
                env=env) == 0
    capsys.readouterr()
    assert main(["device", "rotate-password", "van-1"], env=env) == 0
    return capsys.readouterr().out


def test_rotate_on_mosquitto_without_broker_reload_says_to_reload_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """deploy/config/server.toml has broker_reload commented out: nothing then reloads
    Mosquitto, the rotation waits at "switched" for ever, and the command must not claim
    that the server reloads it."""
    out = _rotate_on(tmp_path, capsys, {"WAYSTATION_SERVER__ENROL__BROKER_KIND": "mosquitto"})
    assert "the server reloads it" not in out
    assert "enrol.broker_reload is not set" in out
    assert "systemctl reload mosquitto" in out


def test_rotate_with_broker_reload_says_the_server_reloads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _rotate_on(tmp_path, capsys, {
        "WAYSTATION_SERVER__ENROL__BROKER_KIND": "mosquitto",
        "WAYSTATION_SERVER__ENROL__BROKER_RELOAD": '["systemctl", "reload", "mosquitto"]'})
    assert "the server reloads it through enrol.broker_reload" in out


def test_rotate_on_the_embedded_broker_needs_no_reload(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _rotate_on(tmp_path, capsys, {})
    assert "no reload needed" in out and "the server reloads it" not in out


def test_a_switch_without_broker_reload_on_mosquitto_is_logged(tmp_path: Path) -> None:
    """The server's side: the journal says why the rotation does not move on."""
    from structlog.testing import capture_logs

    from broker.embedded.passwords import hash_password
    from broker.server.rotation_files import broker_logins
    from waystation.config.server import EnrolConfig

    pw = tmp_path / "passwd"
    pw.write_text(f"van-1:{hash_password('old-password-1')}\n")
    for kind, logged in (("mosquitto", True), ("embedded", False)):
        logins = broker_logins(EnrolConfig(broker_kind=kind), lambda: pw)
        with capture_logs() as logs:
            assert logins.switch_many([("van-1", hash_password("new-password-1"))]) == {}
        events = [e for e in logs if e["event"] == "broker_not_reloaded"]
        assert bool(events) is logged, (kind, logs)
        if logged:
            assert "systemctl reload mosquitto" in events[0]["hint"]
