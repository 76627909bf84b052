"""The broker ACL of the design (docs/PROTOCOL.md section 1), as one pure function.

For a device whose username is its device id ``me``:

- publish:   only ``{prefix}/{me}/up`` and ``{prefix}/{me}/status``;
- subscribe: only ``{prefix}/{me}/down``, literally (no wildcards), and the merge
  servers' announcements ``{prefix}/_server/{group}/+/state`` (or one server's);
- receive:   its own ``{prefix}/{me}/down``, anyone's ``{prefix}/{dev}/status``
  (presence is meant for everyone) and ``{prefix}/_server/{group}/{server}/state``.

Only server users publish under ``{prefix}/_server/`` (``_server`` is never a device id).

A server user may do anything under ``{prefix}/``, including shared subscriptions
``$share/{group}/{prefix}/...``. An anonymous client (no username) may do nothing.

The embedded broker applies this through ``broker.embedded.plugins``; Mosquitto gets the
equivalent ``pattern`` rules in its acl_file (see ``mosquitto_acl_lines``).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Literal

__all__ = ["DEVICE_ID_RE", "Action", "allowed", "mosquitto_acl_lines"]

Action = Literal["publish", "subscribe", "receive"]

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Device ids (docs/PROTOCOL.md section 2); a username that is not one gets nothing."""


def allowed(
    username: str | None,
    topic: str,
    action: str,
    *,
    prefix: str,
    server_users: Collection[str],
) -> bool:
    """True when ``username`` may ``action`` ("publish", "subscribe", "receive") ``topic``.

    For "subscribe", ``topic`` is the topic filter as sent in SUBSCRIBE.
    """
    if not username or not topic or action not in ("publish", "subscribe", "receive"):
        return False
    if username in server_users:
        return _server_allowed(topic, action, prefix)
    if not DEVICE_ID_RE.fullmatch(username):
        return False
    if action == "publish":
        return topic in (f"{prefix}/{username}/up", f"{prefix}/{username}/status")
    if action == "subscribe":
        return topic == f"{prefix}/{username}/down" or _server_state(topic, prefix, True)
    # receive
    if topic == f"{prefix}/{username}/down" or _server_state(topic, prefix, False):
        return True
    head = f"{prefix}/"
    if not topic.startswith(head):
        return False
    levels = topic[len(head) :].split("/")
    return (len(levels) == 2 and levels[1] == "status"
            and DEVICE_ID_RE.fullmatch(levels[0]) is not None)


def _server_state(topic: str, prefix: str, subscribe: bool) -> bool:
    """``{prefix}/_server/{group}/{server}/state``; for a subscription the server level
    may be ``+`` (every server of the group)."""
    head = f"{prefix}/_server/"
    if not topic.startswith(head):
        return False
    levels = topic[len(head):].split("/")
    return (len(levels) == 3 and levels[2] == "state"
            and DEVICE_ID_RE.fullmatch(levels[0]) is not None
            and (DEVICE_ID_RE.fullmatch(levels[1]) is not None
                 or (subscribe and levels[1] == "+")))


def _server_allowed(topic: str, action: str, prefix: str) -> bool:
    if action == "subscribe":
        if topic.startswith("$share/"):
            parts = topic.split("/", 2)
            if len(parts) != 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
                return False
            topic = parts[2]
        return topic.startswith(f"{prefix}/") and _valid_filter(topic)
    # publish / receive: a concrete topic name
    return topic.startswith(f"{prefix}/") and "+" not in topic and "#" not in topic


def _valid_filter(topic_filter: str) -> bool:
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def mosquitto_acl_lines(*, prefix: str, server_users: Collection[str]) -> list[str]:
    """The Mosquitto acl_file equivalent of ``allowed`` (one line per list item).

    Mosquitto's ``read`` covers both subscribe and receive, so a device gets only its
    own down topic (no status of others: stricter than ``allowed``, never looser).
    """
    lines = [
        "# Waystation ACL: each device (username = device id) publishes on its own up and",
        "# status topics and reads only its own down topic and the merge servers'",
        "# announcements; server users own the prefix.",
        f"pattern write {prefix}/%u/up",
        f"pattern write {prefix}/%u/status",
        f"pattern read {prefix}/%u/down",
        f"pattern read {prefix}/_server/+/+/state",
    ]
    for user in sorted(server_users):
        lines += ["", f"user {user}", f"topic readwrite {prefix}/#"]
    return lines
