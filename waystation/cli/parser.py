"""The complete `waystation` argument parser, assembled from one module per group.

Building it imports no part (agent, server, broker), so `waystation --help` is fast. A
new group goes into its own ``parser_<group>.py`` with an ``add_<group>(b)`` function
called here, and its leaves into `waystation.cli.commands.HANDLERS`.
"""

from __future__ import annotations

import argparse

from waystation.cli.builder import Builder
from waystation.cli.parser_agent import add_agent
from waystation.cli.parser_data import add_deadletters, add_server_records
from waystation.cli.parser_device import add_broker, add_device
from waystation.cli.parser_server import add_server
from waystation.cli.parser_tools import add_config, add_demo, add_schema


def build_parser() -> argparse.ArgumentParser:
    """The complete `waystation` argument parser (cheap: no part is imported)."""
    b = Builder()
    add_demo(b)
    add_agent(b)
    add_deadletters(b, "agent")
    add_server(b)
    add_server_records(b)
    add_deadletters(b, "server")
    add_device(b)
    add_broker(b)
    add_schema(b)
    add_config(b)
    return b.parser


def command_paths(parser: argparse.ArgumentParser | None = None) -> list[list[str]]:
    """Every command path of the parser, groups and leaves (for help and tests)."""
    parser = parser or build_parser()
    out: list[list[str]] = []

    def walk(p: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(parser, [])
    return out


def leaf_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The subparser of `command` (a path such as "device add"), to report its usage."""
    current = parser
    for word in command.split():
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction) and word in action.choices:
                current = action.choices[word]
                break
        else:
            return current
    return current


__all__ = ["build_parser", "command_paths", "leaf_parser"]
