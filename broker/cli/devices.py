"""Device lifecycle: `waystation device list|remove|wipe|resync|disable|enable`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from broker.cli.common import now_ms, open_existing_store, server_config
from broker.cli.logins import revoke_credentials
from broker.server import devstate, login_removal, registry
from broker.server.store.base import CommandRow
from waystation.cli.output import iso, print_json, table


def cmd_device_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device list`: registered devices and their scopes, and removed ones
    whose broker login the server has still to delete."""
    store = open_existing_store(server_config(args, env))
    try:
        devices = registry.list_devices(store)
        with store.read() as txn:
            removals = login_removal.pending(txn)
    finally:
        store.close()
    if args.json:
        print_json([devstate.device_doc(d) for d in devices])
        return 0
    if not devices and not removals:
        print("no devices registered (add one with `waystation device add ID --scope S`)")
        return 0
    table(["DEVICE", "SCOPES", "STATE", "CREATED"],
           [[d.id, ",".join(d.scopes), devstate.lifecycle(d), iso(d.created_ms)]
            for d in devices]
           + [[r.device, "-", devstate.removal_state(login_removal.removal_doc(r)), "-"]
              for r in removals])
    return 0


def cmd_device_remove(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device remove ID`: revoke a device (its records stay)."""
    config = server_config(args, env)
    rabbit = config.enrol.broker_kind == "rabbitmq"
    store = open_existing_store(config)
    try:
        registry.remove_device(store, args.device_id, now_ms(), remove_login=rabbit)
    finally:
        store.close()
    if rabbit:
        by_hand = " ".join([*config.enrol.rabbitmq_delete_user, args.device_id])
        note = ("; the running server deletes its RabbitMQ user at its next tick "
                "(`device list` shows it pending until then; with no server running: "
                f"`{by_hand}`); delete its {args.device_id}.mqtt-password file from the "
                "folder you import definitions from, or an import brings the user back")
    else:
        note = revoke_credentials(env, args.device_id, config.enrol.password_file)
    if getattr(args, "json", False):
        doc = {"device": args.device_id, "removed": True,
               "login_removed": bool(note) and not rabbit}
        if rabbit:
            doc["login_removal_queued"] = True  # the running server deletes the user
        print_json(doc)
        return 0
    print(f"device {args.device_id} removed: its changes are refused from now on{note}")
    return 0


def _issue(args: argparse.Namespace, env: Mapping[str, str], cmd: str, what: str) -> int:
    store = open_existing_store(server_config(args, env))
    try:
        row = registry.issue_command(store, args.device_id, cmd, now_ms())
        with store.read() as txn:
            device = txn.get_device(args.device_id)
    finally:
        store.close()
    # A command that needs a capability is kept pending for a device that has not said it
    # speaks it (registry.deliverable): "sent at once" would not be true.
    speaks = device is not None and registry.deliverable(row, device.caps)
    if getattr(args, "json", False):
        print_json({"device": args.device_id, "command": row.to_json(), "effect": what,
                    "device_speaks": speaks})
        return 0
    print(f"{cmd} queued for {args.device_id} (command {row.id}): {what}; it is sent at once "
          "if the device is online, else when it next connects")
    if not speaks:
        print(f"note: {args.device_id} has not said it understands `{cmd}` (an agent older "
              "than this server, or it has not connected since the upgrade): the command "
              "waits until it does")
    return 0


def cmd_device_wipe(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device wipe ID`: order a device to erase its local data."""
    return _issue(args, env, "wipe",
                  "the device is disabled now and erases its local data (its key first) "
                  "before anything else reaches it; it gets no data again until "
                  f"`waystation device enable {args.device_id}`; `device list` shows when "
                  "the wipe is done")


def cmd_device_resync(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device resync ID`: order a device to catch up from zero."""
    return _issue(args, env, "resync", "the device will rebuild its data from the server")


def cmd_device_sync(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device sync ID`: order a device to sync now, whatever its policy."""
    return _issue(args, env, "sync", "the device sends what it holds back now (sync windows, "
                  "metered link, battery), for its policy.sync_now_s")


def _set_enabled(args: argparse.Namespace, env: Mapping[str, str], enabled: bool) -> int:
    store = open_existing_store(server_config(args, env))
    sync: CommandRow | None = None
    try:
        if enabled:
            _, sync = registry.enable_device(store, args.device_id, now_ms())
        else:
            registry.set_enabled(store, args.device_id, False)
    finally:
        store.close()
    state = "enabled: its changes are accepted" if enabled else \
        ("disabled: it gets no data and its changes wait on the device until "
         f"`waystation device enable {args.device_id}`")
    if sync is not None:
        state += (f"; sync queued (command {sync.id}): it sends the changes it held at once "
                  "if online, else when it next connects")
    if getattr(args, "json", False):
        doc: dict[str, Any] = {"device": args.device_id, "enabled": enabled, "effect": state}
        if enabled:
            doc["command"] = None if sync is None else sync.to_json()
        print_json(doc)
        return 0
    print(f"device {args.device_id} {state}")
    return 0


def cmd_device_disable(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device disable ID`."""
    return _set_enabled(args, env, False)


def cmd_device_enable(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """`waystation device enable ID`."""
    return _set_enabled(args, env, True)


__all__ = ["cmd_device_disable", "cmd_device_enable", "cmd_device_list",
           "cmd_device_remove", "cmd_device_resync", "cmd_device_sync", "cmd_device_wipe"]
