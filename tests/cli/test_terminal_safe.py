"""What the CLI prints cannot drive the operator's terminal (`waystation.cli.terminal`):
device-chosen text outside tables is escaped, `--json` still parses to the original,
daemons are left alone; and through a real command: a record value with ANSI escapes,
written by a device, read back with `server get` on a real LMDB store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from waystation.cli.entry import main
from waystation.cli.output import print_json, printable
from waystation.cli.terminal import terminal_safe

HOSTILE = "\x1b[2J\x1b]0;owned\x07line\rforged\x9b31m\u202eevil\x7f"


def _module(monkeypatch: pytest.MonkeyPatch) -> str:
    mod = ModuleType("fake_handlers")

    def text(args: argparse.Namespace, env: Mapping[str, str]) -> int:
        print(f"name: {HOSTILE}\n\tnext line")
        return 0

    def as_json(args: argparse.Namespace, env: Mapping[str, str]) -> int:
        print_json({"name": HOSTILE})
        return 0

    mod.text = text  # type: ignore[attr-defined]
    mod.as_json = as_json  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_handlers", mod)
    return "fake_handlers"


def test_free_text_is_escaped_and_json_still_parses(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _module(monkeypatch)
    assert main(["server", "status"], env={}, handlers={"server status": f"{mod}:text"}) == 0
    out = capsys.readouterr().out
    assert out == ("name: \\x1b[2J\\x1b]0;owned\\x07line\\rforged\\u009b31m\\u202eevil"
                   "\\u007f\n\tnext line\n")
    assert main(["server", "devices"], env={},
                handlers={"server devices": f"{mod}:as_json"}) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out
    assert json.loads(out) == {"name": HOSTILE}
    # a daemon is not wrapped (its own log output)
    assert main(["server", "run"], env={}, handlers={"server run": f"{mod}:text"}) == 0
    assert HOSTILE in capsys.readouterr().out


@given(st.text())
def test_escaped_text_holds_nothing_a_terminal_acts_on(text: str) -> None:
    safe = terminal_safe(text)
    assert not any(ord(c) < 0x20 and c not in "\n\t" for c in safe)
    assert not any(0x7f <= ord(c) <= 0x9f for c in safe)
    assert not any(c in "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                   for c in safe)
    if text.isprintable():
        assert safe == text


@given(st.text())
def test_a_table_cell_stays_one_line_and_holds_nothing_a_terminal_acts_on(text: str) -> None:
    cell = printable(text)
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in cell)
    assert not any(c in "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                   for c in cell)
    if text.isprintable():
        assert cell == text


def test_a_cell_writes_line_breaks_and_terminal_codes_as_escapes() -> None:
    assert printable("a\nb\tc\x1b[2J\x9b\u202e") == "a\\nb\\tc\\x1b[2J\\u009b\\u202e"


def test_a_devices_escape_codes_in_a_record_reach_server_get_escaped(
        tmp_path: Path) -> None:
    """Through the real CLI process on a real LMDB store (what an operator's terminal
    gets): the value a device wrote is shown with its codes escaped."""
    from tests.server.helpers import changes, make_engine, task
    from tests.server.test_cli_records_letters import ws

    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "passwd")}
    engine, store, _ = make_engine(tmp_path / "server", {"van-1": ["r1"]})
    try:
        engine.handle_up("van-1", changes("van-1", [task(1, "t-1", "r1", notes=HOSTILE)]))
        engine.tick()
    finally:
        store.close()
    got = ws(env, "server", "get", "tasks", "t-1")
    assert got.returncode == 0, got.stderr
    assert not any(c in got.stdout for c in "\x1b\x07\r\x9b\u202e\x7f"), got.stdout
    assert "\\u009b31m\\u202eevil\\u007f" in got.stdout, got.stdout
    doc = json.loads(ws(env, "server", "get", "tasks", "t-1", "--json").stdout)

    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    assert HOSTILE in strings(doc)  # --json parses back to exactly what was written
