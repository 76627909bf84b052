"""The command table: each leaf command path -> the ``"module:function"`` that runs it.

Handlers are imported only when their command runs, so ``waystation --help`` stays fast
and each part plugs in its commands by defining the named function:

    def cmd_put(args: argparse.Namespace, env: Mapping[str, str]) -> int: ...

A command whose module or function does not exist yet reports "not yet available" and
exits 3; it never pretends to work.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from waystation.cli.exitcodes import EXIT_NOT_AVAILABLE
from waystation.cli.parser_schema_history import HANDLERS as SCHEMA_HISTORY_HANDLERS

Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]


# Command path -> "module:function". Parts replace a stub by creating the function.
HANDLERS: dict[str, str] = {
    "demo": "waystation.demo:cmd_demo",
    "agent run": "agent.cli:cmd_run",
    "agent status": "agent.cli:cmd_status",
    "agent sync": "agent.cli:cmd_sync_now",
    "agent put": "agent.cli:cmd_put",
    "agent get": "agent.cli:cmd_get",
    "agent list": "agent.cli:cmd_list",
    "agent fetch": "agent.cli:cmd_fetch",
    "agent delete": "agent.cli:cmd_delete",
    "agent incr": "agent.cli:cmd_incr",
    "agent add": "agent.cli:cmd_add",
    "agent remove": "agent.cli:cmd_remove",
    "agent deadletters list": "agent.cli:cmd_deadletters",
    "agent deadletters show": "agent.letters_cli:cmd_deadletters_show",
    "agent deadletters retry": "agent.letters_cli:cmd_deadletters_retry",
    "agent deadletters discard": "agent.letters_cli:cmd_deadletters_discard",
    "agent conflicts": "agent.cli:cmd_conflicts",
    "agent watch": "agent.cli:cmd_watch",
    "agent token add": "agent.tokens_cli:cmd_token_add",
    "agent token list": "agent.tokens_cli:cmd_token_list",
    "agent token remove": "agent.tokens_cli:cmd_token_remove",
    "agent encrypt": "agent.atrest_cli:cmd_encrypt",
    "agent decrypt": "agent.atrest_cli:cmd_decrypt",
    "agent rekey": "agent.atrest_cli:cmd_rekey",
    "agent salvage": "agent.salvage_cli:cmd_salvage",
    "server run": "broker.cli.daemons:cmd_server_run",
    "server status": "broker.cli.status:cmd_server_status",
    "server devices": "broker.cli.status:cmd_server_devices",
    "server forget": "broker.cli.servers:cmd_server_forget",
    "server conflicts": "broker.cli.conflicts:cmd_server_conflicts",
    "server resolve": "broker.cli.conflicts:cmd_server_resolve",
    "server get": "broker.cli.records:cmd_server_get",
    "server list": "broker.cli.records:cmd_server_list",
    "server export": "broker.cli.records:cmd_server_export",
    "server deadletters list": "broker.cli.deadletters:cmd_server_deadletters",
    "server deadletters show": "broker.cli.letters:cmd_server_deadletters_show",
    "server deadletters retry": "broker.cli.letters:cmd_server_deadletters_retry",
    "server deadletters discard": "broker.cli.letters:cmd_server_deadletters_discard",
    "server backup": "broker.cli.backup:cmd_server_backup",
    "server restore": "broker.cli.backup:cmd_server_restore",
    "server encrypt": "broker.cli.atrest:cmd_server_encrypt",
    "server decrypt": "broker.cli.atrest:cmd_server_decrypt",
    "server rekey": "broker.cli.atrest:cmd_server_rekey",
    "device add": "broker.cli.enrol:cmd_device_add",
    "device list": "broker.cli.devices:cmd_device_list",
    "device remove": "broker.cli.devices:cmd_device_remove",
    "device wipe": "broker.cli.devices:cmd_device_wipe",
    "device resync": "broker.cli.devices:cmd_device_resync",
    "device sync": "broker.cli.devices:cmd_device_sync",
    "device disable": "broker.cli.devices:cmd_device_disable",
    "device enable": "broker.cli.devices:cmd_device_enable",
    "device scopes": "broker.cli.scopes:cmd_device_scopes",
    "device rotate-password": "broker.cli.rotate:cmd_device_rotate_password",
    "device renew-cert": "broker.cli.renew_cert:cmd_device_renew_cert",
    "broker run": "broker.embedded.amqtt_broker:broker_run",
    "broker passwd": "broker.cli.logins:cmd_broker_passwd",
    "schema check": "waystation.cli.schema_cmd:cmd_schema_check",
    "schema export": "waystation.cli.schema_cmd:cmd_schema_export",
    **SCHEMA_HISTORY_HANDLERS,
    "config show": "waystation.cli.config_cmd:cmd_config_show",
}


# ----------------------------------------------------------------- handler lookup

def load_callable(spec: str) -> Callable[..., Any] | None:
    """Import ``"module:function"``; None when the module or function does not exist.

    Any other import failure (a bug in an existing module) propagates.
    """
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            return None
        raise
    func = getattr(module, func_name, None)
    return func if callable(func) else None


def not_available(command: str) -> Handler:
    """The handler of a command that is not built yet: says so and exits 3."""

    def handler(args: argparse.Namespace, env: Mapping[str, str]) -> int:
        print(f"waystation {command}: not yet available in this version "
              "(it is built in a later release)", file=sys.stderr)
        return EXIT_NOT_AVAILABLE

    handler.not_available = True  # type: ignore[attr-defined]
    return handler


def resolve_handler(command: str, spec: str | None = None) -> Handler:
    """The handler for `command` (from HANDLERS unless `spec` is given)."""
    target = spec if spec is not None else HANDLERS.get(command)
    func = load_callable(target) if target else None
    if func is None:
        return not_available(command)
    return func


def is_available(command: str) -> bool:
    """True when `command`'s handler exists (is not the not-yet-available stub)."""
    return not getattr(resolve_handler(command), "not_available", False)


__all__ = ["HANDLERS", "Handler", "is_available", "load_callable", "not_available",
           "resolve_handler"]
