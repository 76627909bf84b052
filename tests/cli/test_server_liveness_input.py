"""Hostile operator input to `waystation server status|devices|forget`: absurd
`--stale-after` values and server ids that no `server_id` can be get a short, clear
usage error (exit 2, README "Exit codes"), never a traceback, a silent default or a
terminal flooded with what was typed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.server.store import open_store
from broker.server.store.base import ServerRow
from waystation.cli import main
from waystation.config import ServerConfig, load_config

HUGE = "9" * 5000
"""More digits than Python's int() reads by default (4300)."""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An LMDB store holding a running server's row and a gone one's."""
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server")}
    store = open_store(load_config(ServerConfig, None, env))
    now = int(time.time() * 1000)
    try:
        store.transact(lambda txn: txn.put_server(ServerRow("srv-run", "main", "1", now, now)))
        store.transact(lambda txn: txn.put_server(
            ServerRow("srv-old", "main", "1", now - 10**9, now - 10**8)))
    finally:
        store.close()
    return env


def _run(env: dict[str, str], capsys: pytest.CaptureFixture[str],
         *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv), env=env)
    except SystemExit as exc:  # argparse's own exit, should main let it through
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


@pytest.mark.parametrize("command", ["status", "devices", "forget"])
@pytest.mark.parametrize("value", ["-1", "0", "abc", "1e3", "1.5", "nan", "", "+5", "1_000",
                                   "99999999999999999999999", HUGE, "31622401"])
def test_absurd_stale_after_is_a_usage_error(env: dict[str, str],
                                             capsys: pytest.CaptureFixture[str],
                                             command: str, value: str) -> None:
    """Negative, zero, non-numeric, past a year or past int() itself: exit 2, one short
    line saying what is allowed (before the fix a huge value was taken, so a crashed
    server counted as running for ever, and 5,000 digits were echoed back)."""
    extra = ["srv-old"] if command == "forget" else []
    code, err = _run(env, capsys, "server", command, f"--stale-after={value}", *extra)
    assert code == 2, err
    assert "--stale-after" in err and "from 1 to 31622400" in err, err
    assert len(err.splitlines()[-1]) < 300, err


def test_sane_stale_after_values_still_work(env: dict[str, str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The bounds themselves and a padded number are taken."""
    for value in ("1", "31622400", " 60 "):
        code, err = _run(env, capsys, "server", "status", "--json", f"--stale-after={value}")
        assert code == 0, err


@pytest.mark.parametrize("server_id", ["", " ", "x" * 100_000, "ünïcode", "a\x1b[31mred\x07",
                                       "nl\nx", "-dash-first", "x" * 65, "a/b"])
def test_forget_with_an_id_no_server_can_have_is_a_usage_error(
        env: dict[str, str], capsys: pytest.CaptureFixture[str], server_id: str) -> None:
    """Empty, very long, unicode or control characters: exit 2 with the id's rules, the id
    shown escaped and cut short; nothing is forgotten."""
    code, err = _run(env, capsys, "server", "forget", "--", server_id)
    assert code == 2, err
    assert "not a valid server id" in err, err
    assert len(err.splitlines()[-1]) < 300, err
    assert "\x1b" not in err and "\x07" not in err
    store = open_store(load_config(ServerConfig, None, env))
    try:
        with store.read() as txn:
            assert {r.id for r in txn.servers()} == {"srv-run", "srv-old"}
    finally:
        store.close()


def test_forget_still_refuses_a_running_server_and_an_unknown_one(
        env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """A valid id keeps its answers: running -> exit 1, unknown -> exit 1, gone -> 0."""
    assert _run(env, capsys, "server", "forget", "srv-run")[0] == 1
    assert _run(env, capsys, "server", "forget", "srv-nine")[0] == 1
    assert _run(env, capsys, "server", "forget", "srv-old")[0] == 0
