"""The long-running server-side processes: `waystation server run` (and `broker run`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

from broker.cli.common import server_config
from waystation.config import BrokerConfig, ServerConfig, load_config

if TYPE_CHECKING:
    from broker.embedded.server_login import AwaitedServerPassword

log = structlog.get_logger(__name__)

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def cmd_server_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation server run`: the merge server in the foreground (`broker.server.daemon`)."""
    from broker.server.daemon import run
    from waystation.logs import configure_logging
    from waystation.ports import check_listen

    config = server_config(args, env)
    configure_logging(config.log)
    # A busy metrics port is found now, before the server opens its store or connects to
    # the broker: one line naming the port and its config key, exit code 4.
    if config.metrics_port is not None:
        check_listen(config.metrics_host, config.metrics_port, "server", "metrics_port")
    config = with_generated_login(config, env)
    return run(config, env=env, password_provider=awaited_login(config, env))


def with_generated_login(config: ServerConfig, env: Mapping[str, str]) -> ServerConfig:
    """`config`, logging in with the password `broker run` generated on this machine when
    no password is configured (`broker.embedded.server_login`)."""
    from broker.embedded.server_login import server_password_file

    mqtt = config.mqtt
    if (mqtt.password is not None or mqtt.password_file is not None or mqtt.username is None
            or config.amqp.enabled):
        return config
    broker = load_config(BrokerConfig, None, env)
    generated = server_password_file(broker.data_dir)
    if not generated.is_file():
        if mqtt.host in _LOOPBACK:
            log.warning("server_password_missing", path=str(generated),
                        hint="no mqtt password is configured and the embedded broker has "
                             "not generated one yet: start `waystation broker run` on this "
                             "machine (the server logs in once it has), or set "
                             "mqtt.password_file")
        return config
    log.info("server_password_generated_used", path=str(generated), user=mqtt.username)
    return config.model_copy(update={"mqtt": mqtt.model_copy(
        update={"password_file": generated})})


def awaited_login(config: ServerConfig, env: Mapping[str, str]) -> AwaitedServerPassword | None:
    """For a server on this machine with no password at all (`with_generated_login`
    found no generated one yet): the file `broker run` will write, read at each attempt."""
    from broker.embedded.server_login import AwaitedServerPassword, server_password_file

    mqtt = config.mqtt
    if (mqtt.password is not None or mqtt.password_file is not None or mqtt.username is None
            or config.amqp.enabled or mqtt.host not in _LOOPBACK):
        return None
    broker = load_config(BrokerConfig, None, env)
    return AwaitedServerPassword(server_password_file(broker.data_dir))


def cmd_broker_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation broker run`: the embedded MQTT broker (`broker.embedded.amqtt_broker`)."""
    from broker.embedded.amqtt_broker import broker_run

    return broker_run(args, env)


__all__ = ["awaited_login", "cmd_broker_run", "cmd_server_run", "with_generated_login"]
