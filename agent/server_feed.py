"""A `server` feed event on each up/down transition of the merge server group as the
sync policy sees it (`agent.policy.server.ServerWatch`, PROTOCOL.md §7.12).

The daemon records what its policy holds back in meta "policy" whenever that changes
(`Sync.record_policy`); its `server` part carries the group's `up`. In that same
transaction, `note` compares it with the state last told to apps (meta "server_told",
kept across daemon restarts) and appends `server` `{group, up, since_ms}` when it
differs: one event per transition, however many servers announce or how often, and
none when a restarted daemon finds the group as it left it. A group whose state is
unknown (`up: null`: nothing announced, or the announcements were cleared) raises no
event: every daemon start passes through it before the retained announcements arrive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.core import Work

TOLD = "server_told"
"""Meta key: {group, up} of the last `server` event."""


def transition(told: Mapping[str, Any] | None,
               server: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `server` event's data for the policy's `server` doc ({group, up,
    down_since_ms, up_since_ms}) given the state last told, or None: nothing to tell."""
    if server is None or not isinstance(server.get("up"), bool):
        return None
    group, up = server.get("group"), server["up"]
    if told is not None and told.get("group") == group and told.get("up") == up:
        return None
    since = server.get("up_since_ms" if up else "down_since_ms")
    return {"group": group, "up": up, "since_ms": since if isinstance(since, int) else None}


def note(work: Work, server: Mapping[str, Any] | None) -> bool:
    """Append the `server` event for a transition (see module); returns whether it did."""
    data = transition(work.tx.meta(TOLD), server)
    if data is None:
        return False
    if data["since_ms"] is None:
        data["since_ms"] = work.now()
    work.tx.set_meta(TOLD, {"group": data["group"], "up": data["up"]})
    work.feed("", "", "server", data)
    return True


__all__ = ["TOLD", "note", "transition"]
