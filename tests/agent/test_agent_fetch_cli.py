"""`waystation agent fetch` and the retention lines of `agent status`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from waystation.cli import main


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"WAYSTATION_AGENT__DATA_DIR": str(tmp_path / "data"),
            "WAYSTATION_AGENT__DEVICE_ID": "van-1",
            "WAYSTATION_AGENT__SCOPES": '["route-42"]',
            "WAYSTATION_AGENT__STORAGE__QUOTA_BYTES": str(64 << 20)}


def run(env: dict[str, str], capsys: pytest.CaptureFixture[str],
        *argv: str) -> tuple[int, str, str]:
    code = main(["agent", *argv], env=env)
    out, err = capsys.readouterr()
    return code, out, err


def test_fetch_queues_keys_and_says_the_daemon_is_needed(
        env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Keys not held are asked for; without a daemon the command says what it waits on;
    status counts them and shows the quota."""
    code, out, _ = run(env, capsys, "fetch", "tasks", "t-1", "t-2")
    assert code == 0
    assert "asked the server for 2 record(s): t-1, t-2" in out
    assert "sync daemon is not running" in out
    code, out, _ = run(env, capsys, "fetch", "tasks", "t-1", "--json")
    assert json.loads(out) == {"collection": "tasks", "records": [], "waiting": ["t-1"],
                               "missing": []}
    code, out, _ = run(env, capsys, "status")
    assert "retention: 0 record(s) evicted, 2 asked back" in out
    assert "disk quota: " in out and f"of {64 << 20} bytes used" in out


@pytest.mark.parametrize(("argv", "needle"), [
    (("fetch", "nope", "k"), "collection"),
    (("fetch", "tasks", *[f"k{i}" for i in range(101)]), "at most 100"),
    (("fetch", "tasks", "k", "--wait", "301"), "wait_s"),
    (("fetch", "tasks", "k", "--wait", "soon"), "number"),
])
def test_bad_fetch_arguments(env: dict[str, str], capsys: pytest.CaptureFixture[str],
                             argv: tuple[str, ...], needle: str) -> None:
    """Wrong arguments exit non-zero with a one-line reason."""
    code, _out, err = run(env, capsys, *argv)
    assert code != 0
    assert needle in err
