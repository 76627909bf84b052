"""The parser's building blocks: the top-level parser, command groups and leaves.

`Builder.leaf` records each leaf's command path in ``args.command`` (the key of
`waystation.cli.commands.HANDLERS`), and gives part commands their ``--config``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from waystation import PROTOCOL_VERSION, __version__
from waystation.cli.exitcodes import EXIT_CODES_HELP

TOP_DESCRIPTION = """\
Offline-first, store-and-forward sync for fleets of edge devices over MQTT.

Each device runs an agent that writes to its local store first and syncs with the
server whenever the link is up; the server merges every change field by field and
sends the result to the devices that share the records' scope. Start with
`waystation demo` to watch a small fleet sync on this machine."""

EPILOG = EXIT_CODES_HELP + """

configuration: --config FILE (TOML) plus WAYSTATION_<PART>__<KEY>__<SUBKEY>=value
environment overrides; see `waystation config show agent|server|broker`."""


class Builder:
    """Adds command groups and leaf commands, recording each leaf's command path."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(
            prog="waystation", description=TOP_DESCRIPTION, epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--version", action="version",
                                 version=f"waystation {__version__} (protocol {PROTOCOL_VERSION})")
        self.top = self.parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
        self.groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}

    def group(self, name: str, summary: str, description: str) -> None:
        outer, _, last = name.rpartition(" ")
        holder = self.groups[outer] if outer else self.top
        parser = holder.add_parser(last, help=summary, description=description)
        self.groups[name] = parser.add_subparsers(
            dest=f"{name.replace(' ', '_')}_command", metavar="COMMAND", required=True)

    def leaf(self, path: str, summary: str, description: str, *,
             config: str | None = None) -> argparse.ArgumentParser:
        group, _, name = path.rpartition(" ")
        holder = self.groups[group] if group else self.top
        parser = holder.add_parser(name, help=summary, description=description)
        parser.set_defaults(command=path)
        if config is not None:
            parser.add_argument(
                "--config", "-c", metavar="FILE", type=Path, default=None,
                help=f"the {config} config file (TOML); without it the built-in defaults "
                     f"apply. WAYSTATION_{config.upper()}__* environment variables "
                     "override either")
        return parser


def record_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("collection", metavar="COLLECTION",
                        help="collection name, as in the collection schema")
    parser.add_argument("key", metavar="KEY", help="the record's key")


def json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (stable keys) instead of text")


__all__ = ["EPILOG", "TOP_DESCRIPTION", "Builder", "json_flag", "record_args"]
