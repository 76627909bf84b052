"""A connection that hears nothing (a mixin of `agent.daemon.AgentDaemon`).

A link can be up and deaf: the broker answers pings and takes the device's messages but
delivers nothing back (a session the broker believes offline after a take-over, a
subscription lost in a broker failover). The device then waits for ever, its catch-ups
and changes unanswered, and reconnecting is what heals it (the broker resends what the
persistent session queued). A merge server that is announced up (or whose state is not
announced) answers a catch-up or a batch of changes within seconds, so a request
unanswered, with nothing at all from the server, for `sync.deaf_after_s` (60 s) is taken
as a deaf link: the agent drops the
connection cleanly (no will: the device is not offline) and reconnects at once. The
wait doubles after each such reconnect that heals nothing (a server that is announced but
hung), up to `DEAF_AFTER_MAX_S`, and starts again at the first answer.

A server announced down is not the link's fault, but the announcement may be the last
thing a link delivered before going deaf (the retained "down" a reconnect received; the
"up" that followed never arrived, seen after a broker frozen and resumed took the
session over from a stale connection): so while it is down the wait is
`DOWN_FACTOR` times longer (15 min by default), then the agent reconnects once to hear
the server's state afresh.
"""

from __future__ import annotations

import structlog

from agent.link_progress import LinkProgress
from agent.policy.gate import Gate
from waystation.config import AgentConfig
from waystation.mqtt import MqttLink

log = structlog.get_logger("waystation.agent")

DEAF_AFTER_MAX_S = 900.0
DOWN_FACTOR = 15
"""While the server is announced down, unanswered requests are taken as a deaf link only
after this many `sync.deaf_after_s` (at most `DEAF_AFTER_MAX_S`)."""


class DeafHooks:
    """Provides `_asked`, `_heard` and `_deaf_check` to `AgentDaemon`."""

    cfg: AgentConfig
    dev: str
    gate: Gate
    link: MqttLink
    progress: LinkProgress
    _connected: bool
    _asked_at: float | None = None
    """When the oldest request still waiting for any answer went out (None: none)."""
    _deaf_after: float | None = None
    """The current wait (None: `sync.deaf_after_s`, the first one)."""
    deaf_reconnects: int = 0

    def _asked(self, now: float) -> None:
        """A request the server answers (a catch-up, a batch of changes) went out."""
        if self._asked_at is None:
            self._asked_at = now

    def _heard(self) -> None:
        """Something came from the server on the device's own topic."""
        self._asked_at = None
        self._deaf_after = None

    def _link_changed(self) -> None:
        """Connected or disconnected: a new connection starts listening afresh."""
        self._asked_at = None

    def _deaf_check(self, now: float) -> None:
        asked, wait = self._asked_at, self._deaf_after or self.cfg.sync.deaf_after_s
        if not self._connected or asked is None:
            return
        # A link delivering bytes is not deaf: the answer may be queued behind a page
        # that takes minutes on GPRS (agent.link_progress).
        if now - self.progress.stretched(asked, DEAF_AFTER_MAX_S) < wait:
            return
        if self.cfg.policy.wait_for_server and self.gate.server.up is False and (
                now - asked < min(DOWN_FACTOR * self.cfg.sync.deaf_after_s, DEAF_AFTER_MAX_S)):
            return  # no server to answer: not the link's fault (yet: module docstring)
        log.warning("link_deaf", dev=self.dev, unanswered_s=round(now - asked),
                    action="reconnecting: the broker delivered nothing on this connection")
        self.deaf_reconnects += 1
        self._asked_at = None
        self._deaf_after = max(wait, min(wait * 2, DEAF_AFTER_MAX_S))
        self.link.relogin()


__all__ = ["DEAF_AFTER_MAX_S", "DeafHooks"]
