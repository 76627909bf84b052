"""The operator's record commands use the schema the servers run, not only the file.

After `waystation schema publish fleet-v2.toml` the running servers take version 2 at
once, while the config's `schema_file` still names version 1 until the operator copies
the new file over it (deploy/README.md, "Changing the schema", step 4). `server get`
then called a field of version 2 "not in the schema", `server status` said version 1,
and `server deadletters retry` judged a change written under version 2 against version
1 (refused for now, `schema_version`) although the servers would apply it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.server.store import open_store
from schemas.collection import example_catalog_path
from tests.server.helpers import T0, changes, hp, make_engine
from waystation.cli import main
from waystation.config import ServerConfig, load_config


def _v2(tmp_path: Path) -> Path:
    text = example_catalog_path().read_text()
    assert text.count("\nversion = 1\n") == 1
    head = "[collections.tasks.fields]\n"
    assert text.count(head) == 1
    v2 = text.replace("\nversion = 1\n", "\nversion = 2\n").replace(
        head, head + 'driver = { type = "string" }\n')
    path = tmp_path / "fleet-v2.toml"
    path.write_text(v2)
    return path


def _run(env: dict[str, str], capsys: pytest.CaptureFixture[str], *argv: str
         ) -> tuple[int, Any]:
    capsys.readouterr()
    code = main([*argv, "--json"], env=env)
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out.strip() else out.err


def test_record_commands_follow_the_published_version(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "passwd")}
    assert main(["schema", "publish", str(example_catalog_path())], env=env) == 0
    assert main(["schema", "publish", str(_v2(tmp_path))], env=env) == 0

    store = open_store(load_config(ServerConfig, None, env))
    engine, store, _ = make_engine(tmp_path / "server", {"van-1": ["r1"]}, store=store)
    driver = {"n": 1, "h": hp(T0 + 1), "c": "tasks", "k": "t-1", "s": "r1", "b": 0,
              "op": "put", "f": {"route": "r1", "driver": "Ann"}}
    try:
        engine.handle_up("van-1", changes("van-1", [driver], sv=2))
        # The same change from a device not enrolled yet: kept as a dead letter.
        engine.handle_up("van-9", changes("van-9", [{**driver, "k": "t-9"}], sv=2))
        engine.tick()
    finally:
        store.close()

    code, got = _run(env, capsys, "server", "get", "tasks", "t-1")
    assert code == 0 and got["fields"]["driver"] == "Ann"
    assert got["field_info"]["driver"]["merge"] == "lww"
    capsys.readouterr()
    assert main(["server", "get", "tasks", "t-1"], env=env) == 0
    assert "not in the schema" not in capsys.readouterr().out

    code, status = _run(env, capsys, "server", "status")
    assert code == 0 and status["schema"]["version"] == 2
    assert status["schema"]["file_version"] == 1
    capsys.readouterr()
    assert main(["server", "status"], env=env) == 0
    assert "schema version 2 (published; the schema file" in capsys.readouterr().out

    code, letters = _run(env, capsys, "server", "deadletters", "list")
    [letter] = [d for d in letters if d["device"] == "van-9"]
    assert main(["device", "add", "van-9", "--scope", "r1", "--out", str(tmp_path / "e")],
                env=env) == 0
    code, retried = _run(env, capsys, "server", "deadletters", "retry", str(letter["id"]))
    assert code == 0, retried
    assert retried["removed"] and [c["result"] for c in retried["changes"]] == ["applied"]
    code, got = _run(env, capsys, "server", "get", "tasks", "t-9")
    assert code == 0 and got["fields"]["driver"] == "Ann"
