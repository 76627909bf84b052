"""`waystation device scopes ID --add S --remove S`: change what a device follows."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from broker.cli.common import now_ms, open_existing_store, server_config
from broker.server import registry
from waystation.cli.output import print_json


def cmd_device_scopes(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Add and remove scopes of a registered device, no re-enrolment: its login and its
    agent config stay; the server follows the new list at once and tells the device."""
    add, remove = args.add or [], args.remove or []
    store = open_existing_store(server_config(args, env))
    try:
        device, cmd = registry.change_scopes(store, args.device_id, now_ms(),
                                             add=add, remove=remove)
    finally:
        store.close()
    speaks = "scopes" in device.caps
    if args.json:
        print_json({"device": device.id, "scopes": list(device.scopes),
                    "command": None if cmd is None else cmd.id,
                    "device_speaks_scopes": speaks})
        return 0
    print(f"device {device.id} follows: {', '.join(device.scopes)}")
    if cmd is None:
        return 0
    print(f"the server applies this now (no data of a removed scope is sent, changes to "
          f"it are refused); command {cmd.id} tells the device, at once if it is online, "
          "else when it next connects: it catches up the added scopes and drops the "
          "records of removed ones (keeping its own unsynced writes until they are "
          "answered)")
    if not speaks:
        print(f"note: {device.id} has not said it understands scope changes (an agent "
              "older than this server, or it has not connected since the upgrade): until "
              "it does, set `scopes` in its agent config to the list above and restart it")
    return 0


__all__ = ["cmd_device_scopes"]
