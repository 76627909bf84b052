"""`waystation device rotate-password ID`: a new broker password with no lockout."""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Mapping
from pathlib import Path

from broker.cli.common import now_ms, open_existing_store, server_config
from broker.cli.logins import default_password_file
from broker.errors import InvalidArgument
from broker.server import rotation
from broker.server.rotation_files import RotationFiles
from waystation.cli.output import iso, print_json


def cmd_device_rotate_password(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Start a rotation: the broker accepts the old and the new password from now on; the
    device gets the new one in a `creds` command (or from the operator, when it does
    not speak the capability); the server retires the old one once the device logged
    in with the new, or at the --retire-after deadline."""
    config = server_config(args, env)
    rabbitmq = config.enrol.broker_kind == "rabbitmq"
    password_file: Path | None = None
    if not rabbitmq:
        password_file = (config.enrol.password_file if config.enrol.password_file is not None
                         else default_password_file(env))
        if not Path(password_file).is_file():
            raise InvalidArgument(f"the broker's password file {password_file} does not exist: "
                                  "set enrol.password_file to the one the broker reads (on a "
                                  "RabbitMQ fleet: enrol.broker_kind = \"rabbitmq\")")
    password = secrets.token_urlsafe(24)
    new_hash = _hash(password, rabbitmq=rabbitmq)
    store = open_existing_store(config)
    try:
        rot, cmd = rotation.start(store, args.device_id, password, new_hash, now_ms(),
                                  retire_after_s=args.retire_after)
        with store.read() as txn:
            device = txn.get_device(args.device_id)
    finally:
        store.close()
    if password_file is not None:
        # After the store: a crash in between leaves a rotation whose new password the
        # embedded broker does not take yet; running the command again starts a fresh one.
        RotationFiles(Path(password_file)).begin(args.device_id, new_hash)
    speaks = device is not None and "creds" in device.caps
    if args.json:
        print_json({"device": args.device_id, "rotation": rot.id, "command": cmd.id,
                    "stage": rot.stage, "retire_at": iso(rot.retire_at) or None,
                    "device_speaks_creds": speaks,
                    # For the operator's fallback: a device without the capability,
                    # or one that missed a --retire-after deadline, is configured by hand.
                    "password": password,
                    "broker_kind": config.enrol.broker_kind,
                    "password_file": None if password_file is None else str(password_file)})
        return 0
    if rabbitmq:
        print(f"password rotation {rot.id} started for {args.device_id}: RabbitMQ keeps its "
              "old password until the device has stored the new one; then the server "
              "switches it (enrol.rabbitmq_import)")
    else:
        print(f"password rotation {rot.id} started for {args.device_id}: the embedded broker "
              "accepts its old and its new password until the old one is retired; Mosquitto "
              "takes the old one until the server switches the password file, then only the "
              "new one (the agent falls back to whichever the broker takes)")
    if speaks:
        print(f"command {cmd.id} brings the new password to the device (at once if it is "
              "online, else when it next connects); the server retires the old one once "
              "the device has logged in with the new one"
              + (f", or at {iso(rot.retire_at)} at the latest" if rot.retire_at else ""))
    else:
        print(f"note: {args.device_id} has not said it understands password rotation (an "
              "agent older than this server, or it has not connected since the upgrade): "
              "write this new password into its agent config (mqtt.password or its "
              f"password_file) and restart it:\n{password}")
        if not rot.retire_at:
            print("the old password stays valid until the device logs in with the new one "
                  "through an agent that speaks the capability; set a deadline with "
                  f"`waystation device rotate-password {args.device_id} --retire-after 7d`")
    if rabbitmq:
        print("progress: `waystation device list`; the device's RabbitMQ user gets the new "
              "password at the switch, which later definitions imports keep when "
              "`python -m broker.rabbitmq.definitions` is given --server-config")
    elif config.enrol.broker_reload:
        print(f"progress: `waystation device list` (Mosquitto: the server reloads it through "
              f"enrol.broker_reload when it switches {password_file})")
    elif config.enrol.broker_kind != "mosquitto":
        print(f"progress: `waystation device list` (the embedded broker reads {password_file} "
              "at each login: no reload needed; on Mosquitto set enrol.broker_kind = "
              "\"mosquitto\" and enrol.broker_reload)")
    else:
        # Unset (the example config has it commented out): nothing reloads Mosquitto, which
        # keeps the old password, so the device never logs in with the new one and the
        # rotation waits at "switched" for ever.
        print(f"progress: `waystation device list`. enrol.broker_reload is not set: Mosquitto "
              f"reads {password_file} again only when reloaded, so once `device list` says "
              "switched, reload it (`systemctl reload mosquitto`), or set enrol.broker_reload "
              "= [\"systemctl\", \"reload\", \"mosquitto\"] in the servers' config and "
              "restart them")
    return 0


def _hash(password: str, *, rabbitmq: bool) -> str:
    """The new password's hash in the format of the broker that will hold it."""
    if rabbitmq:
        from broker.rabbitmq.definitions import hash_password as rabbit_hash

        return rabbit_hash(password)
    from broker.embedded.passwords import hash_password

    return hash_password(password)


__all__ = ["cmd_device_rotate_password"]
