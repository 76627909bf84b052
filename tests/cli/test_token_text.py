"""`agent token add|list` in text: the rights shown are the rights checked
(`AppToken.can_read`: a collection the token may write, it may read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.http.auth import TokenStore
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
    head, row = capsys.readouterr().out.splitlines()
    assert head.split() == ["ID", "APP", "READ", "WRITE"]
    assert row.split() == [token.split("_")[1], "scanner", read, write]
    app = TokenStore(tmp_path / "agent").verify(f"Bearer {token}")
    assert app is not None and app.can_read("tasks")
