"""The merge server's announcement (PROTOCOL.md §7.12): a retained `server` message on
``{prefix}/_server/{group}/{server_id}/state``, online while the server runs, offline as
its last will (a crash, a lost link) and on a clean stop.

Devices that see their group announced down keep their changes instead of filling the
broker's queues; a group nobody announced (servers older than this) is not waited for.
``_server`` is never a device id (ids start with a letter or digit), so the topic never
meets a device's own ``{prefix}/{device}/...`` topics.
"""

from __future__ import annotations

from schemas import codec, wire
from schemas.errors import ProtocolError

SERVER_LEVEL = "_server"
STATE_MAX_BYTES = 4096
"""An announcement is read with this limit (PROTOCOL.md §7.12)."""


def state_topic(prefix: str, group: str, server_id: str) -> str:
    return f"{prefix}/{SERVER_LEVEL}/{group}/{server_id}/state"


def state_payload(group: str, server_id: str, online: bool, t_ms: int | None) -> bytes:
    return codec.encode(wire.ServerState(grp=group, srv=server_id, on=online, t=t_ms))


def server_down(topic: str, payload: bytes, *, prefix: str, group: str) -> bool:
    """Whether this message is a server of `group` announcing itself down (its last will
    or its clean stop): readable, `on: false`, `grp`/`srv` matching the topic.

    Where devices get no retained announcements (RabbitMQ, PROTOCOL.md §7.12) a device
    that connected after the servers announced knows only of the server that went down
    and would hold everything while the others still serve; they answer with their own
    announcement, live (broker/server/announcer.py)."""
    parts = topic.split("/")
    if (len(parts) != 5 or parts[0] != prefix or parts[1] != SERVER_LEVEL
            or parts[2] != group or parts[4] != "state" or not payload):
        return False
    try:
        msg = codec.decode(payload, allowed=wire.SERVER_TYPES, max_payload=STATE_MAX_BYTES)
    except ProtocolError:
        return False
    return (isinstance(msg, wire.ServerState) and msg.srv == parts[3] and msg.grp == group
            and msg.on is False)


__all__ = ["SERVER_LEVEL", "STATE_MAX_BYTES", "server_down", "state_payload", "state_topic"]
