"""`agent token add|list` in text: the rights shown are the rights checked
(`AppToken.can_read`: a collection the token may write, it may read), and the list is
a table under column headers like the other lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.http.auth import TokenStore
from tests.cli.tables import table_rows
from waystation.cli import main


def _env(tmp_path: Path) -> dict[str, str]:
    return {"WAYSTATION_AGENT__DATA_DIR": str(tmp_path / "agent"),
            "WAYSTATION_AGENT__DEVICE_ID": "van-1",
            "WAYSTATION_AGENT__SCOPES": '["route-1"]'}


@pytest.mark.parametrize(("argv", "read", "write"), [
    (["--write", "tasks"], "tasks", "tasks"),
    (["--read", "tasks"], "tasks", "-"),
    (["--read", "tasks", "--write", "tasks"], "tasks", "tasks"),
    (["--write", "*"], "*", "*"),
    (["--read", "*", "--write", "tasks"], "*", "tasks"),
])
def test_rights_shown_are_rights_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], read: str, write: str) -> None:
    env = _env(tmp_path)
    assert main(["agent", "token", "add", "scanner", *argv], env=env) == 0
    token, note = capsys.readouterr().out.splitlines()
    assert f"(read {read}; write {write})" in note
    assert main(["agent", "token", "list"], env=env) == 0
    [row] = table_rows(capsys.readouterr().out, "ID")
    assert row["APP"] == "scanner" and (row["READ"], row["WRITE"]) == (read, write)
    app = TokenStore(tmp_path / "agent").verify(f"Bearer {token}")
    assert app is not None and app.can_read("tasks")


def test_list_is_a_table_with_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`agent token list` prints a header line, then one row a token, its id first."""
    env = _env(tmp_path)
    assert main(["agent", "token", "list"], env=env) == 0
    assert capsys.readouterr().out.startswith("no API tokens: issue one with")
    for app in ("scanner", "kiosk"):
        assert main(["agent", "token", "add", app, "--write", "tasks"], env=env) == 0
    capsys.readouterr()
    assert main(["agent", "token", "list"], env=env) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["ID", "APP", "READ", "WRITE"]
    ids = {t.app: t.id for t in TokenStore(tmp_path / "agent").list()}
    assert {r["APP"]: r["ID"] for r in table_rows(out, "ID")} == ids
