"""`waystation agent fetch COLLECTION --where FILTER`: fetch by query from the command
line (PROTOCOL.md §7.14.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from waystation.cli import main


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"WAYSTATION_AGENT__DATA_DIR": str(tmp_path / "data"),
            "WAYSTATION_AGENT__DEVICE_ID": "van-1",
            "WAYSTATION_AGENT__SCOPES": '["route-42"]'}


def run(env: dict[str, str], capsys: pytest.CaptureFixture[str],
        *argv: str) -> tuple[int, str, str]:
    code = main(["agent", *argv], env=env)
    out, err = capsys.readouterr()
    return code, out, err


def test_fetch_where_queues_a_query(env: dict[str, str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The query is queued (no daemon: the command says so); --json prints the request;
    status counts the waiting queries."""
    code, out, _ = run(env, capsys, "fetch", "tasks", "--where",
                       '{"status": "delivered", "eta": {"gte": 5}}', "--limit", "20")
    assert code == 0
    assert "asked the server (fetch query q-" in out and "sync daemon is not running" in out
    code, out, _ = run(env, capsys, "fetch", "tasks", "--where", "{}", "--after", "t-9",
                       "--json")
    doc = json.loads(out)
    assert code == 0 and doc["state"] == "waiting" and doc["records"] == []
    assert doc["collection"] == "tasks" and doc["id"].startswith("q-")
    code, out, _ = run(env, capsys, "status")
    assert "2 fetch queries waiting" in out


@pytest.mark.parametrize(("argv", "needle"), [
    (("fetch", "tasks"), "--where"),
    (("fetch", "tasks", "t-1", "--where", "{}"), "not both"),
    (("fetch", "tasks", "--where", "{status"), "not JSON"),
    (("fetch", "tasks", "--where", "[1]"), "JSON object"),
    (("fetch", "tasks", "--where", '{"nope": 1}'), "nope"),
    (("fetch", "tasks", "--where", '{"eta": "soon"}'), "eta"),
    (("fetch", "tasks", "--where", "{}", "--limit", "0"), "limit"),
    (("fetch", "tasks", "--where", "{}", "--limit", "5000"), "limit"),
    (("fetch", "nope", "--where", "{}"), "collection"),
    (("fetch", "tasks", "t-1", "--limit", "5"), "go with --where"),
])
def test_bad_fetch_where_arguments(env: dict[str, str], capsys: pytest.CaptureFixture[str],
                                   argv: tuple[str, ...], needle: str) -> None:
    """Wrong arguments exit non-zero with a one-line reason, and queue nothing."""
    assert run(env, capsys, "put", "tasks", "t-0", "route=route-42")[0] == 0  # a store
    code, _out, err = run(env, capsys, *argv)
    assert code != 0
    assert needle in err
    code, out, _ = run(env, capsys, "status", "--json")
    assert code == 0 and json.loads(out).get("fetch_queries", 0) == 0
