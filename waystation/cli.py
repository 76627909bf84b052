"""The `waystation` command line: one entry point, subcommands per part.

The parser lives here; the work does not. Each leaf command ("agent put", "server run",
...) is looked up in `HANDLERS`, a table of ``"module:function"`` strings imported only
when that command runs, so ``waystation --help`` stays fast and each part plugs in its
commands by defining the named function:

    def cmd_put(args: argparse.Namespace, env: Mapping[str, str]) -> int: ...

`args` is the parsed namespace (``args.config`` is the ``--config`` path or None;
``args.command`` the command path such as ``"agent put"``), `env` the process
environment (pass it to `waystation.config.load_config`). A command whose module or
function does not exist yet reports "not yet available" and exits 3; it never pretends
to work.

Exit codes: 0 success, 1 error, 2 usage or configuration error, 3 command not
available in this version, 130 interrupted. A `WaystationError` escaping a handler is
printed as one line ``error: <message>`` with the error's exit code, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from waystation import PROTOCOL_VERSION, __version__
from waystation.errors import WaystationError

Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_AVAILABLE = 3
EXIT_INTERRUPTED = 130

# Command path -> "module:function". Parts replace a stub by creating the function.
HANDLERS: dict[str, str] = {
    "demo": "waystation.demo:cmd_demo",
    "agent run": "agent.cli:cmd_run",
    "agent status": "agent.cli:cmd_status",
    "agent sync": "agent.cli:cmd_sync_now",
    "agent put": "agent.cli:cmd_put",
    "agent get": "agent.cli:cmd_get",
    "agent list": "agent.cli:cmd_list",
    "agent delete": "agent.cli:cmd_delete",
    "agent incr": "agent.cli:cmd_incr",
    "agent add": "agent.cli:cmd_add",
    "agent remove": "agent.cli:cmd_remove",
    "agent deadletters": "agent.cli:cmd_deadletters",
    "agent conflicts": "agent.cli:cmd_conflicts",
    "agent watch": "agent.cli:cmd_watch",
    "agent token add": "agent.tokens_cli:cmd_token_add",
    "agent token list": "agent.tokens_cli:cmd_token_list",
    "agent token remove": "agent.tokens_cli:cmd_token_remove",
    "server run": "broker.cli:cmd_server_run",
    "server status": "broker.cli:cmd_server_status",
    "server devices": "broker.cli:cmd_server_devices",
    "server conflicts": "broker.cli:cmd_server_conflicts",
    "server resolve": "broker.cli:cmd_server_resolve",
    "server deadletters": "broker.cli:cmd_server_deadletters",
    "server backup": "broker.cli:cmd_server_backup",
    "server restore": "broker.cli:cmd_server_restore",
    "device add": "broker.cli:cmd_device_add",
    "device list": "broker.cli:cmd_device_list",
    "device remove": "broker.cli:cmd_device_remove",
    "device wipe": "broker.cli:cmd_device_wipe",
    "device resync": "broker.cli:cmd_device_resync",
    "device sync": "broker.cli:cmd_device_sync",
    "device disable": "broker.cli:cmd_device_disable",
    "device enable": "broker.cli:cmd_device_enable",
    "broker run": "broker.embedded.amqtt_broker:broker_run",
    "broker passwd": "broker.cli:cmd_broker_passwd",
    "schema check": "waystation.cli:cmd_schema_check",
    "schema export": "waystation.cli:cmd_schema_export",
    "config show": "waystation.cli:cmd_config_show",
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


# --------------------------------------------------------------- argument types

def parse_value(text: str) -> Any:
    """A command-line VALUE: JSON when it parses as JSON, else the text itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _assignment(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return name, parse_value(value)


def _number(text: str) -> int | float:
    value = parse_value(text)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def _device_id(text: str) -> str:
    import re

    from waystation.config import ID_PATTERN

    if not re.fullmatch(ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a valid device id: use 1 to 64 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit")
    return text


# ------------------------------------------------------------------------- parser

_TOP_DESCRIPTION = """\
Offline-first, store-and-forward sync for fleets of edge devices over MQTT.

Each device runs an agent that writes to its local store first and syncs with the
server whenever the link is up; the server merges every change field by field and
sends the result to the devices that share the records' scope. Start with
`waystation demo` to watch a small fleet sync on this machine."""

_EPILOG = """\
exit codes: 0 success, 1 error, 2 usage or configuration error,
            3 command not available in this version, 130 interrupted.
Configuration: --config FILE (TOML) plus WAYSTATION_<PART>__<KEY>__<SUBKEY>=value
environment overrides; see `waystation config show agent|server|broker`."""


class _Builder:
    """Adds command groups and leaf commands, recording each leaf's command path."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(
            prog="waystation", description=_TOP_DESCRIPTION, epilog=_EPILOG,
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


def _record_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("collection", metavar="COLLECTION",
                        help="collection name, as in the collection schema")
    parser.add_argument("key", metavar="KEY", help="the record's key")


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print JSON (one document) instead of a table")


def build_parser() -> argparse.ArgumentParser:
    """The complete `waystation` argument parser (cheap: no part is imported)."""
    b = _Builder()

    p = b.leaf("demo", "run a small fleet on this machine and watch it sync",
               "Start an embedded broker, a server and three device agents in this process, "
               "make them write while offline and online, and narrate how every change "
               "reaches every device, how counters add up and how a conflict is kept for a "
               "person. Everything lives in a temporary data directory that is removed "
               "afterwards unless --keep is given.")
    p.add_argument("--data-dir", metavar="DIR", type=Path, default=None,
                   help="where the demo keeps its data (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true",
                   help="keep the data directory afterwards, to inspect it")

    # ---- agent
    b.group("agent", "the device agent: run it, read and write records, see its state",
            "Commands of the device agent: `run` is the daemon that keeps the local store "
            "in sync with the server; the other commands read and write the local store "
            "directly (a write is saved locally and synced when the link is up) and show "
            "the agent's status, dead letters and conflicts.")
    b.leaf("agent run", "run the agent daemon (foreground, systemd-friendly)",
           "Run the device agent in the foreground: open the local store, connect to the "
           "broker and keep syncing until stopped (SIGTERM or Ctrl-C). Writes made by "
           "other `waystation agent` commands or by apps on this device are noticed and "
           "sent; the daemon survives losing the link, restarts and power loss.",
           config="agent")
    p = b.leaf("agent status", "show sync state: online, pending, last sync, problems",
               "Show the agent's sync state as people need it: whether it is online, how "
               "many local changes are waiting and how old the oldest one is, when it last "
               "synced, and how many dead letters and open conflicts there are. Works "
               "whether or not the daemon is running.", config="agent")
    _json_flag(p)
    p = b.leaf("agent sync", "sync now: lift the sync windows, metered and battery policy",
               "Tell the running sync daemon to send what its sync policy holds back "
               "(windows, metered link, day's budget, battery) now, for policy.sync_now_s. "
               "A server group announced down still holds everything.", config="agent")
    _json_flag(p)
    p = b.leaf("agent put", "write fields of a record (saved locally, synced later)",
               "Set fields of a record in the local store. Each FIELD=VALUE takes VALUE as "
               "JSON when it parses as JSON (42, true, null, \"text\", [1,2], {\"a\":1}) and "
               "as plain text otherwise. The write is durable when the command returns and "
               "is synced to the server when the link is up.", config="agent")
    _record_args(p)
    p.add_argument("fields", metavar="FIELD=VALUE", nargs="+", type=_assignment,
                   help="a field and its new value (parsed into a (field, value) pair)")
    p = b.leaf("agent get", "show one record as this device sees it",
               "Show one record from the local store: the authoritative value from the "
               "server with this device's pending changes applied, and which fields are "
               "still waiting to sync.", config="agent")
    _record_args(p)
    _json_flag(p)
    p = b.leaf("agent list", "list the records of a collection",
               "List the records of one collection in the local store, with pending "
               "changes applied and deleted records left out.", config="agent")
    p.add_argument("collection", metavar="COLLECTION",
                   help="collection name, as in the collection schema")
    _json_flag(p)
    p = b.leaf("agent delete", "delete a record (saved locally, synced later)",
               "Delete a record in the local store. The deletion syncs like any other "
               "write; a concurrent edit elsewhere is kept in the conflict log.",
               config="agent")
    _record_args(p)
    p = b.leaf("agent incr", "add to a counter field",
               "Add AMOUNT (negative to subtract) to a counter field of a record. "
               "Increments from every device add up exactly, however they interleave.",
               config="agent")
    _record_args(p)
    p.add_argument("field", metavar="FIELD", help="a counter field")
    p.add_argument("amount", metavar="AMOUNT", type=_number, help="a number, e.g. 3 or -1")
    p = b.leaf("agent add", "add members to a set field",
               "Add one or more members to a set field of a record. Sets merge "
               "add-wins: a member added on one device and removed concurrently on "
               "another stays.", config="agent")
    _record_args(p)
    p.add_argument("field", metavar="FIELD", help="a set field")
    p.add_argument("members", metavar="MEMBER", nargs="+", help="set members (strings)")
    p = b.leaf("agent remove", "remove members from a set field",
               "Remove one or more members from a set field of a record, as this device "
               "has seen them; members added concurrently elsewhere stay.", config="agent")
    _record_args(p)
    p.add_argument("field", metavar="FIELD", help="a set field")
    p.add_argument("members", metavar="MEMBER", nargs="+", help="set members (strings)")
    p = b.leaf("agent deadletters", "list local changes the server refused",
               "List the changes this device made that the server rejected for good, "
               "with the reason for each. They were rolled back locally and are kept "
               "here for inspection.", config="agent")
    _json_flag(p)
    p = b.leaf("agent conflicts", "list conflicts involving this device's records",
               "List the conflicts the server reported for records this device holds: "
               "concurrent writes that lost, and manual fields waiting for a person to "
               "decide.", config="agent")
    _json_flag(p)
    p = b.leaf("agent watch", "print changes to local records as they happen",
               "Follow the local store and print every change to its records as it "
               "happens, from this device or from the server, optionally for one "
               "collection only. Stop with Ctrl-C.", config="agent")
    p.add_argument("collection", metavar="COLLECTION", nargs="?", default=None,
                   help="only this collection (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    b.group("agent token", "tokens of the apps that use the local API",
            "Issue, list and remove the tokens apps send to the agent's local API "
            "(Authorization: Bearer TOKEN). A token is shown once, when it is issued, and "
            "stored hashed in the store's directory; the running agent sees changes at "
            "once.")
    p = b.leaf("agent token add", "issue a token for an app",
               "Issue a token for APP with read and write rights on the named collections "
               "('*' for all; writing implies reading). The token is printed once.",
               config="agent")
    p.add_argument("app", metavar="APP", help="the app's name (letters, digits, . _ -)")
    p.add_argument("--read", metavar="COLLECTIONS", action="append", default=[],
                   help="collections it may read (comma-separated, repeatable; '*': all)")
    p.add_argument("--write", metavar="COLLECTIONS", action="append", default=[],
                   help="collections it may write (comma-separated, repeatable; '*': all)")
    p = b.leaf("agent token list", "list the apps' tokens (without secrets)",
               "List the issued tokens: id, app and rights. Secrets are never shown again.",
               config="agent")
    _json_flag(p)
    p = b.leaf("agent token remove", "remove an app's token(s)",
               "Remove a token by its id, or every token of an app by the app's name; "
               "the running agent refuses it from the next request on.", config="agent")
    p.add_argument("ident", metavar="ID_OR_APP", help="a token id or an app name")

    # ---- server
    b.group("server", "the merge server: run it and inspect the fleet's data",
            "Commands of the merge server: `run` consumes every device's changes, merges "
            "them and answers with acks and deltas; the others inspect the authoritative "
            "store and let an operator settle conflicts.")
    b.leaf("server run", "run the merge server (foreground, systemd-friendly)",
           "Run the merge server in the foreground: connect to the broker, consume every "
           "device's changes, merge them into the store, ack each device and send the "
           "result to the devices that share the scope, until stopped.", config="server")
    p = b.leaf("server status", "show the server's state and counters",
               "Show the server's state: the store in use, schema version, scopes and "
               "their sequences, devices known and online, and open conflicts.",
               config="server")
    _json_flag(p)
    p = b.leaf("server devices", "list devices, their scopes and last contact",
               "List every device the server knows, with its scopes, whether it is online, "
               "when it last synced and how far it has caught up.", config="server")
    _json_flag(p)
    p = b.leaf("server conflicts", "list open conflicts",
               "List the open conflicts: manual fields written concurrently by different "
               "devices, each with its candidates, waiting for `server resolve`.",
               config="server")
    _json_flag(p)
    p.add_argument("--all", action="store_true",
                   help="the whole conflict log (closed entries and lww losers too)")
    p.add_argument("--limit", metavar="N", type=int, default=None,
                   help="show at most N entries, newest first (default 1000)")
    p = b.leaf("server resolve", "settle a conflict with a chosen value",
               "Settle an open conflict by writing VALUE (JSON when it parses as JSON, "
               "else text) as the field's authoritative value; every device in the scope "
               "receives it.", config="server")
    p.add_argument("conflict_id", metavar="CONFLICT_ID",
                   help="the conflict's id, from `server conflicts`")
    p.add_argument("value", metavar="VALUE", type=parse_value,
                   help="the value to keep (JSON when it parses, else text)")
    p = b.leaf("server deadletters", "list messages the server refused",
               "List the messages and changes the server refused (malformed, too large, "
               "not allowed, from the far future), with the device and reason, kept for "
               "inspection.", config="server")
    _json_flag(p)
    p.add_argument("--limit", metavar="N", type=int, default=None,
                   help="show at most N dead letters, newest first (default 50)")
    p = b.leaf("server backup", "copy the LMDB store, consistently, while it runs",
               "Write a consistent, compacted copy of the server's LMDB store into DEST, a "
               "new directory laid out as a server data directory (safe while the server "
               "runs); `server restore` puts it back. A PostgreSQL store is backed up with "
               "pg_dump.",
               config="server")
    _json_flag(p)
    p.add_argument("dest", metavar="DEST", help="the backup directory (must not exist)")
    p = b.leaf("server restore", "put a store backup in place (server stopped)",
               "Copy the LMDB backup in SRC (from `server backup`) into data_dir, whose "
               "store must have been moved aside with the server stopped; or, with "
               "--in-place, take the configured store as restored by other means (a "
               "PostgreSQL database after pg_restore). Either way every scope's sequence "
               "moves forward, so each device resyncs by snapshot and keeps its pending "
               "writes; what the server applied after the backup is not in it.",
               config="server")
    _json_flag(p)
    p.add_argument("src", metavar="SRC", nargs="?", default=None,
                   help="a directory written by `server backup`")
    p.add_argument("--in-place", action="store_true",
                   help="the configured store was restored already: only move it on")

    # ---- device
    b.group("device", "register devices with the server and broker",
            "Manage the fleet's devices: register one (credentials, scopes, and an agent "
            "config file to copy to it), list them, or remove one.")
    p = b.leaf("device add", "register a device and write its agent config",
               "Register device ID with the server: give it broker credentials and the "
               "scopes it may read and write, and write an agent config file for it (into "
               "--out) to copy onto the device.", config="server")
    p.add_argument("device_id", metavar="ID", type=_device_id,
                   help="the new device's id (also its broker user name)")
    p.add_argument("--scope", dest="scopes", metavar="S", action="append", required=True,
                   help="a scope the device syncs (repeat for several)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="where to write the device's agent config (default: current directory)")
    p.add_argument("--systemd", action="store_true",
                   help="write the config for the systemd unit's layout on the device: "
                        "/etc/waystation/{ca.pem,fleet.toml}, state in "
                        "/var/lib/waystation/agent, and the password in a separate file "
                        "for LoadCredential= (see deploy/README.md)")
    p = b.leaf("device list", "list registered devices",
               "List the devices registered with the server, with the scopes each may "
               "sync and whether it has broker credentials.", config="server")
    _json_flag(p)
    p = b.leaf("device remove", "revoke a device",
               "Remove device ID: revoke its broker credentials and stop accepting its "
               "changes. Its past changes stay in the store.", config="server")
    p.add_argument("device_id", metavar="ID", type=_device_id, help="the device's id")
    p = b.leaf("device wipe", "order a device to erase its local data",
               "Queue a wipe command for device ID (a lost or stolen device): when it is "
               "next online it erases every local record, outbox entry and dead letter, "
               "keeping only its identity, and reports back. Unsynced writes on it are "
               "lost; that is the point. Combine with `device disable` to refuse it "
               "afterwards.", config="server")
    p.add_argument("device_id", metavar="ID", type=_device_id, help="the device's id")
    p = b.leaf("device resync", "order a device to rebuild its data from the server",
               "Queue a resync command for device ID: it drops its copy of the server's "
               "data and checkpoints, keeps its unsynced writes, and catches up from zero.",
               config="server")
    p.add_argument("device_id", metavar="ID", type=_device_id, help="the device's id")
    p = b.leaf("device sync", "order a device to sync now, whatever its sync policy",
               "Queue a sync command for device ID: for its policy.sync_now_s it sends what "
               "its sync windows, metered-link or battery policy hold back (not while its "
               "server group is announced down). Needs an agent that knows the command "
               "(this version or later); an older one ignores it.", config="server")
    p.add_argument("device_id", metavar="ID", type=_device_id, help="the device's id")
    p = b.leaf("device disable", "refuse a device's changes (keeps its registration)",
               "Disable device ID: its messages are answered with unknown_device until it "
               "is enabled again. Its broker login is kept.", config="server")
    p.add_argument("device_id", metavar="ID", type=_device_id, help="the device's id")
    p = b.leaf("device enable", "accept a disabled device's changes again",
               "Enable device ID again after `device disable`: the server accepts its "
               "changes from its next message on.", config="server")
    p.add_argument("device_id", metavar="ID", type=_device_id, help="the device's id")

    # ---- broker
    b.group("broker", "the embedded MQTT broker",
            "The embedded amqtt broker, for a single-machine fleet or development. "
            "Production fleets may run Mosquitto or EMQX instead (see deploy/).")
    b.leaf("broker run", "run the embedded MQTT broker",
           "Run the embedded amqtt broker in the foreground with Waystation's "
           "authentication (password file) and per-device topic ACL, until stopped.",
           config="broker")
    p = b.leaf("broker passwd", "add or change a broker login (e.g. the server's)",
               "Add USER to the broker's password file (Mosquitto's format, read by the "
               "embedded broker and by Mosquitto alike) with a new random password, or "
               "with one read from standard input (--stdin). Prints the password once. "
               "Devices get their logins from `waystation device add`; use this for the "
               "merge server's login (user waystation-server).", config="broker")
    p.add_argument("user", metavar="USER", help="the login name, e.g. waystation-server")
    p.add_argument("--stdin", action="store_true",
                   help="read the password from standard input instead of generating one")
    p.add_argument("--password-file", type=Path, default=None,
                   help="the password file (default: the broker config's password_file)")

    # ---- schema
    b.group("schema", "check collection schemas, export wire JSON Schemas",
            "Work with schemas: check an operator's collection schema file, or export "
            "the JSON Schema of every wire message.")
    p = b.leaf("schema check", "validate a collection schema file and summarise it",
               "Load a collection schema file (TOML) and validate it: every error names "
               "the file, collection and field. When valid, print its version and each "
               "collection's scope rule and fields with their type and merge strategy.")
    p.add_argument("file", metavar="FILE", type=Path, help="the collection schema (TOML)")
    _json_flag(p)
    p = b.leaf("schema export", "write the wire messages' JSON Schema files",
               "Write the JSON Schema of every wire message (generated from the pydantic "
               "models) into schemas/json/, or with --check verify that the files there "
               "are up to date.")
    p.add_argument("--check", action="store_true",
                   help="do not write; exit non-zero when the files are out of date")
    p.add_argument("--dir", metavar="DIR", type=Path, default=None,
                   help="the directory of the JSON Schema files (default: schemas/json/ "
                        "of the installed package)")

    # ---- config
    b.group("config", "show effective configuration",
            "Inspect configuration as a part will see it: the config file, then "
            "WAYSTATION_<PART>__* environment overrides, then the built-in defaults.")
    p = b.leaf("config show", "print the effective config of a part as TOML",
               "Load the config of PART (agent, server or broker) exactly as its commands "
               "do, file plus environment overrides, and print the effective settings as "
               "TOML with secrets masked. Also a quick way to validate a config file.")
    p.add_argument("part", metavar="PART", choices=("agent", "server", "broker"),
                   help="agent, server or broker")
    p.add_argument("--config", "-c", metavar="FILE", type=Path, default=None,
                   help="the config file (TOML); without it the built-in defaults apply")
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


# ----------------------------------------------------------------- built-in commands

def cmd_schema_check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation schema check FILE`: validate and summarise a collection schema."""
    from schemas.collection import load_catalog

    catalog = load_catalog(args.file)
    if args.json:
        import json

        doc = catalog.model_dump(mode="json", exclude={"source"})
        for coll in doc["collections"].values():
            for name, fspec in coll["fields"].items():
                fspec["merge"] = catalog.collections[coll["name"]].fields[name].strategy
        print(json.dumps({"file": str(args.file), **doc}, indent=2))
        return EXIT_OK
    nfields = sum(len(c.fields) for c in catalog.collections.values())
    print(f"{args.file}: valid collection schema, version {catalog.version}, "
          f"{len(catalog.collections)} collections, {nfields} fields")
    for name, coll in catalog.collections.items():
        scope = (f"scope from field {coll.scope_field!r}" if coll.scope_field is not None
                 else f"fixed scope {coll.scope!r}")
        print()
        print(f"{name}  ({scope})" + (f"  {coll.description}" if coll.description else ""))
        width = max(len(f) for f in coll.fields)
        for fname, spec in coll.fields.items():
            limits = []
            if spec.min is not None:
                limits.append(f"min {_num(spec.min)}")
            if spec.max is not None:
                limits.append(f"max {_num(spec.max)}")
            if spec.max_length is not None:
                limits.append(f"max_length {spec.max_length}")
            line = f"  {fname:<{width}}  {spec.type:<6}  {spec.strategy:<7}  {', '.join(limits)}"
            print(line.rstrip())
    return EXIT_OK


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def cmd_schema_export(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation schema export [--check]`: delegates to `schemas.export.main(argv)`."""
    export_main = load_callable("schemas.export:main")
    if export_main is None:
        return not_available("schema export")(args, env)
    argv = ["--check"] if args.check else []
    if args.dir is not None:
        argv += ["--dir", str(args.dir)]
    return int(export_main(argv) or 0)


def cmd_config_show(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation config show PART [--config F]`: the effective config as TOML."""
    from waystation.config import MODELS, dump_toml, env_overrides, load_config

    model = MODELS[args.part]
    config = load_config(model, args.config, env)
    overrides = env_overrides(model, env)
    header = [f"effective {args.part} config from "
              + (str(args.config) if args.config is not None else "built-in defaults")]
    header += [f"{var} sets {key}" for var, key in overrides.items()]
    header.append("secrets are masked")
    sys.stdout.write(dump_toml(config, mask_secrets=True, header="\n".join(header)))
    return EXIT_OK


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
         handlers: Mapping[str, str] | None = None) -> int:
    """Run the `waystation` command line; returns the exit code.

    `env` defaults to os.environ; `handlers` (default HANDLERS) maps command paths to
    "module:function" handler specs.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    table = HANDLERS if handlers is None else handlers
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version, usage errors
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        handler = resolve_handler(args.command, table.get(args.command))
        return int(handler(args, environ))
    except WaystationError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`waystation agent list | head`): not an error of ours.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except OSError as err:
        # A file the command needs is missing or unreadable (wrong path, wrong user):
        # say which, in one line, instead of a traceback.
        where = f" {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}:{where} (check the path and that this user "
              "may read/write it)", file=sys.stderr)
        return EXIT_ERROR


__all__ = [
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
