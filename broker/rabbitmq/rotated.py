"""Where a rotated device login lives on a RabbitMQ fleet: in the merge server's store.

`waystation device rotate-password` keeps the new password's RabbitMQ hash in the
device's row; once the server has switched it into RabbitMQ (stage "switched" or
"retired"), that hash is the device's login, and a later definitions import must carry
it rather than the enrolment password of the device's `.mqtt-password` file (which would
put back the old password). Before the switch RabbitMQ still holds the enrolment
password, and so does the import.
"""

from __future__ import annotations

import os
from pathlib import Path

from broker.server.rotation import Rotation
from broker.server.rotation_rabbitmq import valid_hash
from waystation.errors import WaystationError


class RotatedLoginsError(Exception):
    """The server's config or store cannot be read, or holds something unusable."""


def rotated_hashes(config_path: Path) -> dict[str, str]:
    """Device -> the RabbitMQ hash of its rotated password, for every device whose
    rotation the server has switched into RabbitMQ."""
    from broker.server.store import open_store
    from waystation.config import ServerConfig, load_config

    try:
        config = load_config(ServerConfig, config_path, os.environ)
    except WaystationError as exc:
        raise RotatedLoginsError(f"--server-config {config_path}: {exc}") from exc
    if config.enrol.broker_kind != "rabbitmq":
        raise RotatedLoginsError(
            f"--server-config {config_path}: enrol.broker_kind is "
            f"{config.enrol.broker_kind!r}, not \"rabbitmq\": its rotations are not RabbitMQ "
            "logins (set broker_kind = \"rabbitmq\" in [enrol] on a RabbitMQ fleet)")
    try:
        store = open_store(config)
        try:
            with store.read() as txn:
                rows = txn.devices()
        finally:
            store.close()
    except WaystationError as exc:
        raise RotatedLoginsError(f"the server's store: {exc}") from exc
    hashes: dict[str, str] = {}
    for row in rows:
        rot = Rotation.from_json(row.rot)
        if rot is None or not rot.switched:
            continue
        if not valid_hash(rot.new_hash):
            raise RotatedLoginsError(
                f"device {row.id}'s rotated password is not held as a RabbitMQ hash (rotated "
                "while enrol.broker_kind was not \"rabbitmq\"): rotate it again with "
                f"`waystation device rotate-password {row.id}`")
        hashes[row.id] = rot.new_hash
    return hashes


__all__ = ["RotatedLoginsError", "rotated_hashes"]
