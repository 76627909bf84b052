"""Deleting a removed device's RabbitMQ user (`broker.server.login_removal`), without
RabbitMQ: `device remove` queues it with the removal, the server runs
`enrol.rabbitmq_delete_user` in a thread of its own at each tick, a failing deletion is
retried, logged and shown (device list, server status) until it works, and enrolling
the id again cancels a deletion still due."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import structlog

from broker.server import login_removal, registry
from broker.server.login_removal import LoginRemovals
from broker.server.rotation_files import ERROR_REPEAT_MS
from broker.server.rotation_rabbitmq import RabbitLogins
from broker.server.store.base import LoginRemoval, Store
from tests.helpers import wait_until
from waystation.cli import main


def _deleter(tmp_path: Path, fail_flag: Path) -> list[str]:
    """A delete command that records each user it deletes in `deleted.txt`; exits 69
    like `rabbitmqctl` with its node down while `fail_flag` exists, and says the user
    does not exist when it was deleted before."""
    script = tmp_path / "fake_delete.py"
    done = tmp_path / "deleted.txt"
    script.write_text(
        "import os, sys\n"
        f"if os.path.exists({str(fail_flag)!r}):\n"
        "    print('Error: unable to perform an operation on node: nodedown', file=sys.stderr)\n"
        "    sys.exit(69)\n"
        "user = sys.argv[-1]\n"
        f"seen = open({str(done)!r}).read().split() if os.path.exists({str(done)!r}) else []\n"
        "if user in seen:\n"
        "    print(f'Error: User \"{user}\" does not exist', file=sys.stderr)\n"
        "    sys.exit(69)\n"
        f"open({str(done)!r}, 'a').write(user + '\\n')\n")
    return [sys.executable, str(script), "delete_user"]


def _deleted(tmp_path: Path) -> list[str]:
    path = tmp_path / "deleted.txt"
    return path.read_text().split() if path.exists() else []


def _pending(store: Store) -> list[LoginRemoval]:
    with store.read() as txn:
        return login_removal.pending(txn)


def test_remove_queues_the_deletion_and_a_new_enrolment_cancels_it(store: Store) -> None:
    registry.add_device(store, "van-1", ["r1"], 0)
    registry.add_device(store, "van-2", ["r1"], 0)
    registry.remove_device(store, "van-1", 10, remove_login=True)
    registry.remove_device(store, "van-2", 11)  # a password file: the CLI deleted it
    [row] = _pending(store)
    assert row.device == "van-1" and row.queued_ms == 10
    with store.read() as txn:
        assert txn.commands() == []  # not a command: nothing a device could be sent
    registry.add_device(store, "van-1", ["r1"], 20)
    assert _pending(store) == []


def test_a_failing_then_working_deletion_is_retried_logged_and_shown(
        store: Store, tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    logins = RabbitLogins(("unused",), background=True,
                          delete_argv=_deleter(tmp_path, flag))
    removals = LoginRemovals(logins)
    for dev in ("van-1", "van-2"):
        registry.add_device(store, dev, ["r1"], 0)
        registry.remove_device(store, dev, 100, remove_login=True)

    def tick_until(now: int, cond: object) -> int:
        done = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done += removals.advance(store, now)
            if callable(cond) and cond():
                return done
            time.sleep(0.02)
        raise AssertionError("timed out")

    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        assert removals.advance(store, 1000) == 0  # started in its thread, not waited for
        assert time.monotonic() - started < 1.0
        tick_until(1000, lambda: all(login_removal.removal_doc(r)["failing"]
                                     for r in _pending(store)))
    failed = [e for e in logs if e["event"] == "device_login_removal_failed"]
    assert sorted(e["dev"] for e in failed) == ["van-1", "van-2"]
    assert all("nodedown" in e["error"] and "delete_user van-" in e["hint"] for e in failed)
    doc = login_removal.removal_doc(_pending(store)[0])
    assert doc["failing"]["at_ms"] == 1000 and "exited with 69" in doc["failing"]["error"]
    assert _deleted(tmp_path) == []

    # Still failing a moment later: retried, but logged and noted again only after
    # ERROR_REPEAT_MS.
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            removals.advance(store, 2000)
            wait_until(lambda: (job := logins._deletes._job) is None or job.done.is_set(),
                       30, message="the deletion ended")
        removals.advance(store, 2000)
    assert not [e for e in logs if e["event"] == "device_login_removal_failed"]
    assert login_removal.removal_doc(_pending(store)[0])["failing"]["at_ms"] == 1000

    flag.unlink()
    with structlog.testing.capture_logs() as logs:
        done = tick_until(1000 + ERROR_REPEAT_MS, lambda: not _pending(store))
    assert done == 2 and sorted(_deleted(tmp_path)) == ["van-1", "van-2"]
    assert sorted(e["dev"] for e in logs if e["event"] == "device_login_removed") \
        == ["van-1", "van-2"]
    assert removals.advance(store, 1000 + ERROR_REPEAT_MS) == 0

    # A user RabbitMQ no longer knows counts as deleted.
    registry.add_device(store, "van-1", ["r1"], 0)
    registry.remove_device(store, "van-1", 200, remove_login=True)
    tick_until(3000 + ERROR_REPEAT_MS, lambda: not _pending(store))
    assert _deleted(tmp_path).count("van-1") == 1


def _config(tmp_path: Path, enrol: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'data_dir = "{tmp_path / "server"}"\n[mqtt]\nport = 1883\n'
                    f"[enrol]\n{enrol}\n")
    return path


def test_cli_queues_the_deletion_and_shows_it_pending(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = _config(tmp_path, 'broker_kind = "rabbitmq"\n'
                             'rabbitmq_delete_user = ["ssh", "mq-1", "rabbitmqctl", '
                             '"delete_user"]')
    env: dict[str, str] = {}
    assert main(["device", "add", "van-1", "--scope", "r1", "--out", str(tmp_path / "out"),
                 "--config", str(conf)], env=env) == 0
    capsys.readouterr()
    assert main(["device", "remove", "van-1", "--json", "--config", str(conf)], env=env) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["login_removal_queued"] is True and doc["login_removed"] is False
    assert main(["device", "list", "--config", str(conf)], env=env) == 0
    assert "broker login deletion pending" in capsys.readouterr().out
    assert main(["server", "status", "--json", "--config", str(conf)], env=env) == 0
    status = json.loads(capsys.readouterr().out)
    assert list(status["login_removals"]) == ["van-1"]
    assert status["login_removals"]["van-1"]["failing"] is None
    assert main(["device", "remove", "van-1", "--config", str(conf)], env=env) != 0
    capsys.readouterr()
    assert main(["device", "add", "van-1", "--scope", "r1", "--out", str(tmp_path / "out2"),
                 "--config", str(conf)], env=env) == 0
    assert main(["device", "remove", "van-1", "--config", str(conf)], env=env) == 0
    assert "ssh mq-1 rabbitmqctl delete_user van-1" in capsys.readouterr().out
