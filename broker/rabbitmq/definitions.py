"""The design's broker ACL, queues and limits for RabbitMQ, as a definitions document.

    doc = definitions(prefix="waystation", server_users={"waystation-server": pw},
                      devices={"van-12": pw12, ...})
    json.dump(doc, fh)        # then: rabbitmqctl import_definitions FILE

RabbitMQ's MQTT plugin maps an MQTT topic to a routing key on `amq.topic` by swapping
`/` and `.` (`waystation/van-12/up` -> `waystation.van-12.up`; a `.` inside a device id
becomes `/`). What this module writes, per user (vhost `/`):

- a device: may publish only the routing keys of its own `up` and `status`, may bind
  (subscribe) only its own `down`, and may declare, bind and read only its own MQTT
  session queues (`mqtt-subscription-{id}qos0|1`). Resource permissions cannot expand
  `{username}` in RabbitMQ 3.10 and a device id may contain `.` (a routing-key level),
  so every device gets its own exact, escaped patterns instead of one shared template.
  A device that logs in with another device's client id is refused when the plugin
  opens that device's session queue (read permission), so it cannot take its messages.
- a merge server: may publish on every device's `down` only, read everything under the
  prefix, and declare/consume the queues named `{prefix}.*` (the shared `up` work
  queue and its own presence queue) and MQTT session queues (a server may also connect
  over MQTT, alone on its subscription: RabbitMQ 3.10 has no shared subscriptions).

Queues: `{prefix}.up`, a replicated quorum queue bound to `{prefix}.*.up`, is where
every device's up message lands; the merge servers consume it as competing consumers
(broker.server.amqp_link). Policies bound it (bytes, redeliveries: a message that made
servers die `delivery-limit` times goes to `{prefix}.up.poison` for the operator) and
bound each device's session queue (`max-length`, oldest dropped: the protocol's
catch-up covers what an offline device misses, as with Mosquitto's
`max_queued_messages`).

Passwords are stored as RabbitMQ's `rabbit_password_hashing_sha256` hashes
(base64(salt + sha256(salt + password)), a 4-byte salt), never in clear.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "HASHING",
    "POISON_SUFFIX",
    "SESSION_MAX_LENGTH",
    "UP_DELIVERY_LIMIT",
    "UP_MAX_BYTES",
    "definitions",
    "device_entries",
    "hash_password",
    "routing_level",
    "server_entries",
    "status_queue_name",
    "up_queue_name",
]

VHOST = "/"
EXCHANGE = "amq.topic"
HASHING = "rabbit_password_hashing_sha256"
SESSION_MAX_LENGTH = 100_000
"""Messages kept per offline device session (Mosquitto's max_queued_messages in deploy/)."""
UP_MAX_BYTES = 1 << 30
"""Bytes the shared up queue may hold before publishers are refused (reject-publish)."""
UP_DELIVERY_LIMIT = 20
"""Deliveries of one up message before it is parked in the poison queue."""
POISON_SUFFIX = ".poison"


def routing_level(name: str) -> str:
    """One MQTT topic level as it appears in a routing key (the plugin swaps `.` and `/`)."""
    return name.replace(".", "/")


def up_queue_name(prefix: str) -> str:
    """The shared work queue of every device's up messages."""
    return f"{prefix}.up"


def status_queue_name(prefix: str, server_id: str) -> str:
    """One merge server's own queue of every device's status (presence)."""
    return f"{prefix}.status.{server_id}"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's sha256 password hash of `password` (random salt unless given)."""
    salt = os.urandom(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ password hashes use a 4-byte salt")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def _user(name: str, password: str, tags: list[str], *,
          password_hash: str | None = None) -> dict[str, Any]:
    return {"name": name,
            "password_hash": hash_password(password) if password_hash is None else password_hash,
            "hashing_algorithm": HASHING, "tags": tags, "limits": {}}


def device_entries(prefix: str, dev: str, password: str, *,
                   password_hash: str | None = None) -> dict[str, dict[str, Any]]:
    """The user, permissions and topic permissions of one device (`password_hash`, when
    given, is its login instead of `password`: a rotated password the server holds as
    a hash only)."""
    level = re.escape(routing_level(dev))
    pre = re.escape(routing_level(prefix))
    sessions = f"mqtt-subscription-{re.escape(dev)}qos[01]"
    return {
        "user": _user(dev, password, [], password_hash=password_hash),
        "permission": {"user": dev, "vhost": VHOST,
                       "configure": f"^{sessions}$",
                       "write": f"^({re.escape(EXCHANGE)}|{sessions})$",
                       "read": f"^({re.escape(EXCHANGE)}|{sessions})$"},
        "topic_permission": {"user": dev, "vhost": VHOST, "exchange": EXCHANGE,
                             "write": f"^{pre}\\.{level}\\.(up|status)$",
                             # its down, and the servers' announcements (§7.12)
                             "read": f"^{pre}\\.({level}\\.down|_server\\.[^.]+\\.[^.]+"
                                     "\\.state)$"},
    }


def server_entries(prefix: str, user: str, password: str) -> dict[str, dict[str, Any]]:
    """The merge servers' user: down topics to publish, its own queues to consume."""
    pre = re.escape(routing_level(prefix))
    # its AMQP queues, and MQTT session queues (a server may also run as an MQTT client)
    own = f"({re.escape(prefix)}\\..*|mqtt-subscription-.*)"
    return {
        "user": _user(user, password, []),
        "permission": {"user": user, "vhost": VHOST, "configure": f"^{own}$",
                       "write": f"^({re.escape(EXCHANGE)}|{own})$",
                       "read": f"^({re.escape(EXCHANGE)}|{own})$"},
        "topic_permission": {"user": user, "vhost": VHOST, "exchange": EXCHANGE,
                             # every down, and its announcements (§7.12)
                             "write": f"^{pre}\\.([^.]+\\.down|_server\\.[^.]+\\.[^.]+"
                                      "\\.state)$",
                             "read": f"^{pre}\\..*$"},
    }


def _queues_and_policies(prefix: str) -> dict[str, list[dict[str, Any]]]:
    up = up_queue_name(prefix)
    poison = up + POISON_SUFFIX
    pre = routing_level(prefix)
    return {
        "queues": [
            {"name": up, "vhost": VHOST, "durable": True, "auto_delete": False,
             "arguments": {"x-queue-type": "quorum"}},
            {"name": poison, "vhost": VHOST, "durable": True, "auto_delete": False,
             "arguments": {"x-queue-type": "quorum"}},
        ],
        "bindings": [
            {"source": EXCHANGE, "vhost": VHOST, "destination": up,
             "destination_type": "queue", "routing_key": f"{pre}.*.up", "arguments": {}},
        ],
        "policies": [
            {"vhost": VHOST, "name": f"{prefix}-up", "pattern": f"^{re.escape(up)}$",
             "apply-to": "queues", "priority": 10,
             "definition": {"max-length-bytes": UP_MAX_BYTES, "overflow": "reject-publish",
                            "delivery-limit": UP_DELIVERY_LIMIT,
                            "dead-letter-exchange": "",
                            "dead-letter-routing-key": poison}},
            {"vhost": VHOST, "name": f"{prefix}-sessions", "pattern": "^mqtt-subscription-",
             "apply-to": "queues", "priority": 0,
             "definition": {"max-length": SESSION_MAX_LENGTH, "overflow": "drop-head"}},
        ],
    }


def definitions(*, prefix: str, server_users: Mapping[str, str],
                devices: Mapping[str, str],
                device_hashes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A definitions document (`rabbitmqctl import_definitions`) for the fleet.
    `device_hashes`: devices whose login is a password hash (a rotated password), which
    wins over their entry in `devices`."""
    hashes = dict(device_hashes or {})
    doc: dict[str, Any] = {"users": [], "vhosts": [{"name": VHOST}], "permissions": [],
                           "topic_permissions": []}
    entries = [server_entries(prefix, u, p) for u, p in server_users.items()]
    entries += [device_entries(prefix, d, p) for d, p in devices.items() if d not in hashes]
    entries += [device_entries(prefix, d, "", password_hash=h) for d, h in sorted(hashes.items())]
    for entry in entries:
        doc["users"].append(entry["user"])
        doc["permissions"].append(entry["permission"])
        doc["topic_permissions"].append(entry["topic_permission"])
    doc.update(_queues_and_policies(prefix))
    return doc


def main(argv: list[str] | None = None) -> int:
    """`python -m broker.rabbitmq.definitions`: print the definitions for the fleet whose
    device passwords are the `*.mqtt-password` files `waystation device add --systemd`
    wrote (one per device, named after it), with the passwords rotated since
    (`waystation device rotate-password`) taken from the server's store
    (--server-config): the store holds the truth about a rotated login."""
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m broker.rabbitmq.definitions",
                                     description=main.__doc__)
    parser.add_argument("--prefix", default="waystation")
    parser.add_argument("--server-user", default="waystation-server")
    parser.add_argument("--server-password-file", type=Path, required=True)
    parser.add_argument("--device-passwords", type=Path, action="append", default=[],
                        metavar="DIR", help="a folder of DEVICE.mqtt-password files")
    parser.add_argument("--server-config", type=Path, metavar="FILE",
                        help="the merge server's config (enrol.broker_kind = \"rabbitmq\"): "
                             "devices whose password was rotated get the rotated one")
    args = parser.parse_args(argv)
    try:
        server_pw = args.server_password_file.read_text().rstrip("\n")
        devices = {p.name.removesuffix(".mqtt-password"): p.read_text().rstrip("\n")
                   for folder in args.device_passwords
                   for p in sorted(folder.glob("*.mqtt-password"))}
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"error: a password file is not UTF-8 text ({exc.reason})", file=sys.stderr)
        return 2
    if not server_pw or any(not pw for pw in devices.values()):
        print("error: an empty password file", file=sys.stderr)
        return 2
    hashes: dict[str, str] = {}
    if args.server_config is None:
        print("note: without --server-config, a device whose password was rotated gets its "
              "enrolment password back from this import", file=sys.stderr)
    else:
        from broker.rabbitmq.rotated import RotatedLoginsError, rotated_hashes

        try:
            hashes = rotated_hashes(args.server_config)
        except RotatedLoginsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    json.dump(definitions(prefix=args.prefix, server_users={args.server_user: server_pw},
                          devices=devices, device_hashes=hashes), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
