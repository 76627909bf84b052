"""The `waystation` parser: help everywhere, usage errors, stubs that say so, dispatch."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from waystation import __version__
from waystation.cli import (
    EXIT_NOT_AVAILABLE,
    HANDLERS,
    build_parser,
    command_paths,
    is_available,
    load_callable,
    main,
    parse_value,
    resolve_handler,
)

VENV_BIN = Path(sys.executable).parent

# One valid invocation of every leaf command.
SAMPLE_ARGS: dict[str, list[str]] = {
    "demo": ["demo", "--keep"],
    "agent run": ["agent", "run", "--config", "agent.toml"],
    "agent status": ["agent", "status", "--json"],
    "agent put": ["agent", "put", "tasks", "t-1", "status=out", "attempts=2"],
    "agent get": ["agent", "get", "tasks", "t-1"],
    "agent list": ["agent", "list", "tasks"],
    "agent fetch": ["agent", "fetch", "tasks", "t-1", "t-2", "--wait", "5", "--json"],
    "agent delete": ["agent", "delete", "tasks", "t-1"],
    "agent incr": ["agent", "incr", "inventory", "sku-1", "stock", "-3"],
    "agent add": ["agent", "add", "tasks", "t-1", "labels", "fragile", "heavy"],
    "agent remove": ["agent", "remove", "tasks", "t-1", "labels", "fragile"],
    "agent deadletters list": ["agent", "deadletters", "list"],
    "agent deadletters show": ["agent", "deadletters", "show", "17"],
    "agent deadletters retry": ["agent", "deadletters", "retry", "van-1:17"],
    "agent deadletters discard": ["agent", "deadletters", "discard", "17", "--json"],
    "agent conflicts": ["agent", "conflicts"],
    "agent sync": ["agent", "sync", "--json"],
    "agent watch": ["agent", "watch", "tasks"],
    "agent token add": ["agent", "token", "add", "scanner", "--read", "*", "--write", "tasks"],
    "agent token list": ["agent", "token", "list", "--json"],
    "agent token remove": ["agent", "token", "remove", "scanner"],
    "server run": ["server", "run", "-c", "server.toml"],
    "server status": ["server", "status", "--json"],
    "server devices": ["server", "devices"],
    "server forget": ["server", "forget", "server-2", "--json"],
    "server conflicts": ["server", "conflicts"],
    "server resolve": ["server", "resolve", "c-1", '"12 Main St"'],
    "server get": ["server", "get", "tasks", "t-1", "--json"],
    "server list": ["server", "list", "tasks", "--scope", "r1", "--limit", "5", "--after",
                    "t-0"],
    "server export": ["server", "export", "--collection", "tasks", "--out", "x.jsonl"],
    "server deadletters list": ["server", "deadletters", "list", "--limit", "5"],
    "server deadletters show": ["server", "deadletters", "show", "3"],
    "server deadletters retry": ["server", "deadletters", "retry", "3", "--json"],
    "server deadletters discard": ["server", "deadletters", "discard", "--all-for", "van-1"],
    "agent encrypt": ["agent", "encrypt", "--key-file", "/etc/waystation/agent.key"],
    "agent decrypt": ["agent", "decrypt", "--batch", "10"],
    "agent rekey": ["agent", "rekey", "--new-key-file", "/etc/waystation/new.key"],
    "agent salvage": ["agent", "salvage", "agent.lmdb.damaged", "--apply", "--json"],
    "server backup": ["server", "backup", "/tmp/bk"],
    "server restore": ["server", "restore", "--in-place"],
    "server encrypt": ["server", "encrypt", "--key-file", "/etc/waystation/server.key"],
    "server decrypt": ["server", "decrypt"],
    "server rekey": ["server", "rekey", "--new-key-file", "/etc/waystation/new.key"],
    "device add": ["device", "add", "van-12", "--scope", "route-42", "--scope", "depot-7"],
    "device list": ["device", "list"],
    "device remove": ["device", "remove", "van-12"],
    "device wipe": ["device", "wipe", "van-12"],
    "device resync": ["device", "resync", "van-12"],
    "device sync": ["device", "sync", "van-12"],
    "device disable": ["device", "disable", "van-12"],
    "device enable": ["device", "enable", "van-12"],
    "device scopes": ["device", "scopes", "van-12", "--add", "route-7"],
    "device rotate-password": ["device", "rotate-password", "van-12", "--retire-after", "7d"],
    "device renew-cert": ["device", "renew-cert", "van-12", "--days", "365"],
    "broker run": ["broker", "run"],
    "broker passwd": ["broker", "passwd", "waystation-server"],
    "schema check": ["schema", "check", "fleet.toml"],
    "schema export": ["schema", "export", "--check"],
    "schema diff": ["schema", "diff", "old.toml", "new.toml"],
    "schema publish": ["schema", "publish", "fleet.toml"],
    "schema history": ["schema", "history"],
    "schema rollback": ["schema", "rollback"],
    "config show": ["config", "show", "agent"],
}


def test_table_covers_every_leaf_command() -> None:
    """Every leaf command of the parser has a handler entry, and nothing else does."""
    paths = [" ".join(p) for p in command_paths()]
    leaves = {p for p in paths if not any(q.startswith(p + " ") for q in paths)}
    assert leaves == set(HANDLERS) == set(SAMPLE_ARGS)


def test_handler_specs_are_module_function() -> None:
    """Each table entry is "module:function"."""
    for spec in HANDLERS.values():
        module, sep, func = spec.partition(":")
        assert sep and module and func.isidentifier()


@pytest.mark.parametrize("path", [[], *command_paths()], ids=lambda p: " ".join(p) or "top")
def test_help_everywhere(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` works on every group and command and describes it in a paragraph."""
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: waystation" + "".join(f" {p}" for p in path))
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 8


def test_help_as_a_real_process() -> None:
    """The installed `waystation --help` runs as a process and lists every group."""
    result = subprocess.run([str(VENV_BIN / "waystation"), "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for group in ("demo", "agent", "server", "device", "broker", "schema", "config"):
        assert group in result.stdout


def test_python_dash_m() -> None:
    """`python -m waystation --version` works."""
    result = subprocess.run([sys.executable, "-m", "waystation", "--version"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip().startswith(f"waystation {__version__}")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version and protocol version."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"waystation {__version__} (protocol 1)"


@pytest.mark.parametrize("argv", [
    ["frobnicate"], [], ["agent"], ["agent", "frob"], ["agent", "put", "tasks", "k"],
    ["agent", "put", "tasks", "k", "novalue"], ["agent", "incr", "c", "k", "f", "lots"],
    ["agent", "incr", "c", "k", "f", "true"], ["device", "add", "bad id", "--scope", "s"],
    ["device", "add", "van-1"], ["config", "show", "toaster"], ["agent", "run", "--bogus"],
], ids=lambda a: " ".join(a) or "empty")
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown commands and bad arguments exit 2 with a usage line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: waystation") and "error:" in err


@pytest.mark.parametrize("command", sorted(HANDLERS))
def test_every_sample_invocation_parses(command: str) -> None:
    """The sample invocation of each command parses to that command."""
    assert build_parser().parse_args(SAMPLE_ARGS[command]).command == command


def test_not_yet_available_commands_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    """Every command without a real handler yet says so on stderr and exits 3."""
    stubs = [c for c in HANDLERS if not is_available(c)]
    for command in stubs:
        assert main(SAMPLE_ARGS[command]) == EXIT_NOT_AVAILABLE
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (f"waystation {command}: not yet available in this version "
                                "(it is built in a later release)\n")


def test_missing_module_or_function_falls_back_to_stub(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A handler whose module or function does not exist is the exit-3 stub."""
    assert load_callable("waystation.no_such_module:cmd") is None
    assert load_callable("no_such_package.cli:cmd") is None
    assert load_callable("waystation.cli:no_such_function") is None
    assert load_callable("waystation.cli:HANDLERS") is None  # not callable
    handler = resolve_handler("agent frob", "waystation.no_such_module:cmd")
    assert handler(argparse.Namespace(), {}) == EXIT_NOT_AVAILABLE
    assert "waystation agent frob: not yet available" in capsys.readouterr().err


def test_existing_function_is_used() -> None:
    """A handler spec naming an existing function resolves to that function."""
    assert resolve_handler("x", "waystation.cli:parse_value") is parse_value
    assert resolve_handler("config show").__name__ == "cmd_config_show"


def test_broken_module_is_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler module that fails to import for another reason raises, not "not available"."""
    (tmp_path / "ws_broken_handler_mod.py").write_text("import ws_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        load_callable("ws_broken_handler_mod:cmd")


@pytest.mark.parametrize(("text", "value"), [
    ("42", 42), ("-1.5", -1.5), ("true", True), ("null", None), ('"007"', "007"),
    ("007", "007"), ("out for delivery", "out for delivery"), ("[1, 2]", [1, 2]),
    ('{"a": 1}', {"a": 1}), ("", ""),
])
def test_values_are_json_when_they_parse(text: str, value: object) -> None:
    """VALUE arguments are JSON when they parse, else plain strings."""
    assert parse_value(text) == value


def test_put_assignments_are_parsed() -> None:
    """agent put turns FIELD=VALUE arguments into (field, value) pairs."""
    args = build_parser().parse_args(
        ["agent", "put", "tasks", "t-1", "status=out", "eta=17", "note=a=b", "proof={\"x\":1}"])
    assert args.fields == [("status", "out"), ("eta", 17), ("note", "a=b"), ("proof", {"x": 1})]
    assert args.collection == "tasks" and args.key == "t-1" and args.config is None


def test_device_add_collects_scopes() -> None:
    """device add collects repeated --scope options and the output directory."""
    args = build_parser().parse_args(
        ["device", "add", "van-12", "--scope", "a", "--scope", "b", "--out", "o", "-c", "s.toml"])
    assert (args.device_id, args.scopes, args.out, args.config) == (
        "van-12", ["a", "b"], Path("o"), Path("s.toml"))


@pytest.mark.parametrize("argv, command", [
    (["server", "deadletters"], "server deadletters list"),
    (["server", "deadletters", "--json", "--limit", "5"], "server deadletters list"),
    (["agent", "deadletters", "--json"], "agent deadletters list"),
])
def test_bare_deadletters_lists(argv: list[str], command: str) -> None:
    """`deadletters` without a subcommand is `deadletters list`, as in earlier versions."""
    args = build_parser().parse_args(argv)
    assert args.command == command
    assert args.json is ("--json" in argv)


@pytest.mark.parametrize("argv, config, as_json", [
    (["server", "deadletters", "--config", "x.toml", "--json", "list"], "x.toml", True),
    (["server", "deadletters", "list", "--config", "y.toml"], "y.toml", False),
    (["agent", "deadletters", "-c", "a.toml", "retry", "4"], "a.toml", False),
    (["agent", "deadletters", "--json", "show", "4", "-c", "b.toml"], "b.toml", True),
])
def test_deadletters_group_options_reach_the_subcommand(argv: list[str], config: str,
                                                         as_json: bool) -> None:
    """--config / --json given to the group are not reset by the subcommand (which would
    silently read another store)."""
    args = build_parser().parse_args(argv)
    assert str(args.config) == config and args.json is as_json
