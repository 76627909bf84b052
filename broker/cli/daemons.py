"""The long-running server-side processes: `waystation server run` (and `broker run`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from broker.cli.common import server_config


def cmd_server_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server run`: the merge server in the foreground (`broker.server.daemon`)."""
    from broker.server.daemon import run
    from waystation.logs import configure_logging

    config = server_config(args, env)
    configure_logging(config.log)
    return run(config, env=env)


def cmd_broker_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation broker run`: the embedded MQTT broker (`broker.embedded.amqtt_broker`)."""
    from broker.embedded.amqtt_broker import broker_run

    return broker_run(args, env)


__all__ = ["cmd_broker_run", "cmd_server_run"]
