"""The commands the CLI implements itself: schema check, config show, error reporting."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from schemas.collection import example_catalog_path
from waystation.cli import EXIT_NOT_AVAILABLE, main


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------- schema check

def test_schema_check_example(capsys: pytest.CaptureFixture[str]) -> None:
    """schema check on the bundled example prints version, collections and fields, the
    fields of each collection as a table under headers."""
    assert main(["schema", "check", str(example_catalog_path())]) == 0
    out = capsys.readouterr().out
    assert "valid collection schema, version 1, 3 collections" in out
    assert "inventory  (scope from field 'depot')" in out
    assert "inspections  (fixed scope 'fleet')" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()
             if line.startswith("  ")}
    assert lines["stock"][:3] == ["int", "counter", "min"]
    assert lines["address"][:2] == ["string", "manual"]
    assert lines["tags"][:2] == ["set", "set"]
    assert lines["proof"] == ["json", "lww", "-"]
    # each collection's fields under column headers, like every other table
    assert lines["FIELD"] == ["TYPE", "MERGE", "LIMITS"]
    assert sum(line.split() == ["FIELD", "TYPE", "MERGE", "LIMITS"]
               for line in out.splitlines()) == 3


def test_schema_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    """schema check --json prints the schema as JSON with each field's effective merge."""
    assert main(["schema", "check", "--json", str(example_catalog_path())]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 1
    assert doc["collections"]["tasks"]["fields"]["status"]["merge"] == "lww"
    assert doc["collections"]["inventory"]["fields"]["stock"]["merge"] == "counter"


BROKEN_SCHEMAS = [
    # (file text, words the one-line error must contain)
    ("version = 1\n[collections.tasks\n", ["not valid TOML", "line 2"]),
    ("version = 0\n[collections.t]\nscope = \"s\"\n[collections.t.fields]\na = "
     "{ type = \"string\" }\n", ["'version'"]),
    ("version = 1\n", ["no collections"]),
    ("version = 1\n[collections.Tasks]\nscope = \"s\"\n", ["collection 'Tasks'", "name"]),
    ("version = 1\n[collections.tasks]\nscope = \"s\"\n", ["collection 'tasks'", "no fields"]),
    ("version = 1\n[collections.tasks]\nscope = \"s\"\n[collections.tasks.fields]\n"
     "eta = { type = \"date\" }\n", ["collection 'tasks'", "field 'eta'", "type"]),
    ("version = 1\n[collections.tasks]\nscope = \"s\"\n[collections.tasks.fields]\n"
     "n = { type = \"string\", merge = \"counter\" }\n",
     ["collection 'tasks'", "field 'n'", "counter"]),
    ("version = 1\n[collections.tasks]\nscope = \"s\"\n[collections.tasks.fields]\n"
     "n = { type = \"int\", colour = 1 }\n", ["collection 'tasks'", "field 'n'", "colour"]),
    ("version = 1\n[collections.tasks]\nscope_field = \"route\"\n[collections.tasks.fields]\n"
     "n = { type = \"int\" }\n", ["collection 'tasks'", "scope_field 'route'"]),
]


@pytest.mark.parametrize(("text", "words"), BROKEN_SCHEMAS)
def test_schema_check_broken_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   text: str, words: list[str]) -> None:
    """A broken schema exits 2 with one error line naming the file, collection and field."""
    path = write(tmp_path / "fleet.toml", text)
    assert main(["schema", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1
    assert "Traceback" not in err
    for word in words:
        assert word in err


def test_schema_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing schema file is one error line naming it."""
    assert main(["schema", "check", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: cannot read the collection schema" in capsys.readouterr().err


def test_schema_export_delegates_to_schemas_export(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """schema export runs schemas.export.main when it exists, else exits 3 saying so."""
    if not _export_exists():
        assert main(["schema", "export", "--check"]) == EXIT_NOT_AVAILABLE
        assert "waystation schema export: not yet available" in capsys.readouterr().err
        return
    out = tmp_path / "json"
    out.mkdir()
    assert main(["schema", "export", "--check", "--dir", str(out)]) != 0  # nothing there yet
    assert main(["schema", "export", "--dir", str(out)]) == 0
    assert sorted(out.glob("*.json"))
    assert main(["schema", "export", "--check", "--dir", str(out)]) == 0


def _export_exists() -> bool:
    import importlib.util

    return importlib.util.find_spec("schemas.export") is not None


# -------------------------------------------------------------------- config show

def test_config_show_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """config show prints the effective config as TOML that parses."""
    assert main(["config", "show", "broker"], env={}) == 0
    out = capsys.readouterr().out
    assert out.startswith("# effective broker config from built-in defaults\n")
    doc = tomllib.loads(out)
    assert doc["port"] == 1883 and doc["server_users"] == ["waystation-server"]


def test_config_show_masks_secrets_and_shows_overrides(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Secrets are masked; environment overrides are applied and listed."""
    conf = write(tmp_path / "server.toml",
                 '[mqtt]\npassword = "hunter2"\n[store]\nkind = "postgres"\n'
                 'url = "postgresql://ws:dbsecret@db/ws"\n')
    env = {"WAYSTATION_SERVER__MQTT__PORT": "1884", "WAYSTATION_SERVER__LOG__FORMAT": "json"}
    assert main(["config", "show", "server", "--config", str(conf)], env=env) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "dbsecret" not in out
    assert "# WAYSTATION_SERVER__MQTT__PORT sets mqtt.port" in out
    doc = tomllib.loads(out)
    assert doc["mqtt"]["port"] == 1884 and doc["log"]["format"] == "json"
    assert doc["mqtt"]["password"] == "**********"
    assert doc["store"]["url"] == "postgresql://ws:**********@db/ws"


def test_config_show_bad_config_is_one_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid config is reported as one `error:` line with exit code 2."""
    conf = write(tmp_path / "agent.toml", "[mqtt]\nport = 70000\n")
    assert main(["config", "show", "agent", "-c", str(conf)], env={}) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"error: {conf}: mqtt.port: must be a whole number from 1 to "
                            "65535 (got 70000)\n")


def test_config_show_bad_env_override(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown override variable is named in the error."""
    assert main(["config", "show", "agent"], env={"WAYSTATION_AGENT__MQTT__HOTS": "x"}) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: WAYSTATION_AGENT__MQTT__HOTS: 'mqtt.hots' is not a setting")
    assert "did you mean 'host'" in err


# ------------------------------------------------------------------ error handling

HANDLER_MODULE = """
from waystation.errors import ConfigError, WaystationError

class Custom(WaystationError):
    exit_code = 7

def fails(args, env):
    raise Custom("the store is full;\\n  free some space")

def interrupted(args, env):
    raise KeyboardInterrupt

def sees_env(args, env):
    print(env["WHO"], args.collection)
    return 5
"""

TEST_TABLE = {"agent list": "ws_cli_test_handlers:fails",
              "agent watch": "ws_cli_test_handlers:interrupted",
              "agent get": "ws_cli_test_handlers:sees_env"}


@pytest.fixture
def test_handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    write(tmp_path / "ws_cli_test_handlers.py", HANDLER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return TEST_TABLE


def test_waystation_error_is_one_line_with_its_exit_code(
        test_handlers: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """A WaystationError from a handler prints `error: <message>` on one line, no traceback."""
    assert main(["agent", "list", "tasks"], handlers=test_handlers) == 7
    assert capsys.readouterr().err == "error: the store is full; free some space\n"


def test_keyboard_interrupt_exits_130(test_handlers: dict[str, str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in a handler exits 130 without a traceback."""
    assert main(["agent", "watch"], handlers=test_handlers) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_handler_gets_args_and_env(test_handlers: dict[str, str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A plugged-in handler receives the parsed args and the env; its return is the exit code."""
    assert main(["agent", "get", "tasks", "t-1"], env={"WHO": "me"}, handlers=test_handlers) == 5
    assert capsys.readouterr().out == "me tasks\n"


def test_an_os_error_in_a_handler_is_one_line_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A handler hitting an unreadable or missing file prints one `error:` line naming
    the file and exits 1 (no traceback)."""
    def boom(args: object, env: object) -> int:
        raise PermissionError(13, "Permission denied", str(tmp_path / "ca.pem"))

    import sys
    module = type(sys)("boom_handlers")
    module.boom = boom  # type: ignore[attr-defined]
    sys.modules["boom_handlers"] = module
    try:
        code = main(["schema", "check", "x.toml"], env={},
                    handlers={"schema check": "boom_handlers:boom"})
    finally:
        del sys.modules["boom_handlers"]
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: Permission denied:")
    assert "ca.pem" in err and "Traceback" not in err
