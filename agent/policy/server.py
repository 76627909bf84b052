"""Is a merge server up? Follows the retained announcements of one server group (pure).

Every server of a group announces itself on ``{prefix}/_server/{group}/{server}/state``
(retained, with an offline last will; PROTOCOL.md §7.12). The group is up while any
member's latest announcement says online. A group nobody ever announced (old servers
that do not announce) is unknown, which is not a reason to wait: old servers keep
working with new agents.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerWatch:
    members: dict[str, bool] = field(default_factory=dict)
    down_since_ms: int | None = None
    """When the group went down (the last member's offline announcement or, for a
    retained one seen at connect, its time stamp)."""
    up_since_ms: int | None = None
    """When the group came up (the first member's online announcement since it was
    down or unknown); None while it is not up."""

    def on_state(self, server: str, online: bool, t_ms: int) -> None:
        was = self.up
        self.members[server] = online
        if self.up is False and was is not False:
            self.down_since_ms = t_ms
        elif self.up:
            self.down_since_ms = None
        if self.up and was is not True:
            self.up_since_ms = t_ms
        elif not self.up:
            self.up_since_ms = None

    def forget(self, server: str) -> None:
        """A retained announcement was cleared (an empty retained message)."""
        self.members.pop(server, None)
        if self.up is not False:
            self.down_since_ms = None
        if not self.up:
            self.up_since_ms = None

    @property
    def up(self) -> bool | None:
        if not self.members:
            return None
        return any(self.members.values())


__all__ = ["ServerWatch"]
