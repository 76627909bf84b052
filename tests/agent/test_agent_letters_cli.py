"""`waystation agent deadletters list|show|retry|discard` on a real local store; the
commands run as real processes (the installed `waystation` executable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.api import Agent
from schemas import wire
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig, load_config

WAYSTATION = str(Path(sys.executable).parent / "waystation")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"WAYSTATION_AGENT__DATA_DIR": str(tmp_path / "data"),
            "WAYSTATION_AGENT__DEVICE_ID": "van-1",
            "WAYSTATION_AGENT__SCOPES": '["route-42", "depot-7", "fleet"]'}


def ws(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    return subprocess.run([WAYSTATION, "agent", *argv], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=False)


def _open(env: dict[str, str]) -> Agent:
    """The store the commands of `env` use, opened in this process."""
    return Agent.open(load_config(AgentConfig, None, env), load_catalog(example_catalog_path()))


def _put(env: dict[str, str], key: str, fields: dict[str, object]) -> None:
    """A local write (the setup, done in this process: each `waystation` run costs most of
    a second, and the CLI's put has its own tests in test_agent_cli.py)."""
    with _open(env) as ag:
        ag.put("tasks", key, fields)


def _refuse(env: dict[str, str], *numbers: int) -> None:
    """The server's permanent rejection of these changes, applied as the daemon would."""
    with _open(env) as ag:
        ag.sync.apply_reject(wire.Reject(rj=[
            wire.Rejection(n=n, code="rule_rejected", reason="unknown status", perm=True)
            for n in numbers]))


def _pending(env: dict[str, str]) -> int:
    """Changes waiting in the store (read in this process, as `_put`)."""
    with _open(env) as ag:
        return ag.status().pending


def test_show_retry_discard(env: dict[str, str]) -> None:
    _put(env, "t-1", {"route": "route-42", "status": "odd"})
    with _open(env) as ag:
        ag.increment("tasks", "t-1", "attempts", 2)
    _refuse(env, 1, 2)
    assert _pending(env) == 0

    listed = json.loads(ws(env, "deadletters", "list", "--json").stdout)
    assert [d["change_id"] for d in listed] == ["van-1:1", "van-1:2"]
    assert json.loads(ws(env, "deadletters", "--json").stdout) == listed   # bare form

    shown = ws(env, "deadletters", "show", "1")
    assert shown.returncode == 0, shown.stderr
    assert "change van-1:1: put tasks/t-1 (scope route-42)" in shown.stdout
    assert "refused: rule_rejected: unknown status" in shown.stdout
    assert 'set status: "odd"' in shown.stdout
    doc = json.loads(ws(env, "deadletters", "show", "van-1:2", "--json").stdout)
    assert doc["change"]["i"] == {"attempts": 2}

    retried = ws(env, "deadletters", "retry", "1", "--json")
    assert retried.returncode == 0, retried.stderr
    result = json.loads(retried.stdout)
    assert result["retried"] == 1 and result["state"] == "pending" and result["n"] > 2
    assert _pending(env) == 1          # queued again, as a new change
    got = json.loads(ws(env, "get", "tasks", "t-1", "--json").stdout)
    assert got["fields"]["status"] == "odd"

    gone = ws(env, "deadletters", "discard", "2")
    assert gone.returncode == 0 and "stays rolled back" in gone.stdout
    assert json.loads(ws(env, "deadletters", "--json").stdout) == []
    assert _pending(env) == 1


@pytest.mark.parametrize("argv, code, text", [
    (["deadletters", "show", "7"], 1, "no dead letter with change number 7 on this device "
                                        "(see `waystation agent deadletters list`)"),
    (["deadletters", "retry", "7"], 1, "no dead letter with change number 7 on this device "
                                        "(see `waystation agent deadletters list`)"),
    (["deadletters", "discard", "7"], 1, "no dead letter with change number 7 on this device "
                                        "(see `waystation agent deadletters list`)"),
    (["deadletters", "show", "seven"], 2, "not a change number"),
    (["deadletters", "retry", "0"], 2, "not a change number"),
    (["deadletters", "discard", "van-1:-3"], 2, "not a change number"),
])
def test_wrong_numbers(env: dict[str, str], argv: list[str], code: int, text: str) -> None:
    _put(env, "t-1", {"route": "route-42"})
    proc = ws(env, *argv)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and text in proc.stderr


def test_retry_checks_the_current_schema(env: dict[str, str], tmp_path: Path) -> None:
    """A change whose scope this device no longer has is refused again, and kept."""
    _put(env, "t-1", {"route": "route-42"})
    _refuse(env, 1)
    narrower = {**env, "WAYSTATION_AGENT__SCOPES": '["depot-7"]'}
    proc = ws(narrower, "deadletters", "retry", "1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [d["n"] for d in json.loads(ws(env, "deadletters", "--json").stdout)] == [1]
