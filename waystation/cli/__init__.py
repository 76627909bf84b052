"""The `waystation` command line: one entry point, subcommands per part.

The parser lives here; the work does not. The package holds one job per module:

    exitcodes.py    the exit codes, and the table `--help` prints
    commands.py     the command table: command path -> "module:function", imported lazily
    builder.py      top-level parser, groups and leaves (`args.command` = the path)
    parser.py       the whole parser, from parser_<group>.py modules
    argtypes.py     argument types (VALUE as JSON or text, FIELD=VALUE, numbers, ids)
    output.py       tables for people, one JSON document for `--json`
    entry.py        `main`: parse, dispatch, errors -> one line and an exit code
    schema_cmd.py, config_cmd.py   the built-in `schema` and `config` commands
    config_text.py  `config show`'s TOML: unset optional keys as comments (pure)

Each leaf command ("agent put", "server run", ...) is looked up in `HANDLERS` and
imported only when that command runs; a part plugs in its commands by defining

    def cmd_put(args: argparse.Namespace, env: Mapping[str, str]) -> int: ...

`args` is the parsed namespace (``args.config`` is the ``--config`` path or None;
``args.command`` the command path such as ``"agent put"``), `env` the process
environment (pass it to `waystation.config.load_config`).
"""

from __future__ import annotations

from waystation.cli.argtypes import parse_value
from waystation.cli.commands import (
    HANDLERS,
    Handler,
    is_available,
    load_callable,
    not_available,
    resolve_handler,
)
from waystation.cli.entry import main
from waystation.cli.exitcodes import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_AVAILABLE,
    EXIT_OK,
    EXIT_USAGE,
)
from waystation.cli.parser import build_parser, command_paths

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_AVAILABLE",
    "EXIT_OK",
    "EXIT_USAGE",
    "HANDLERS",
    "Handler",
    "build_parser",
    "command_paths",
    "is_available",
    "load_callable",
    "main",
    "not_available",
    "parse_value",
    "resolve_handler",
]
