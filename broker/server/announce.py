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

SERVER_LEVEL = "_server"


def state_topic(prefix: str, group: str, server_id: str) -> str:
    return f"{prefix}/{SERVER_LEVEL}/{group}/{server_id}/state"


def state_payload(group: str, server_id: str, online: bool, t_ms: int | None) -> bytes:
    return codec.encode(wire.ServerState(grp=group, srv=server_id, on=online, t=t_ms))


__all__ = ["SERVER_LEVEL", "state_payload", "state_topic"]
