"""How long changes sent wait for the server's answer before they go again (pure).

PROTOCOL.md §9.2: changes not answered within the ack timeout are sent again. While the
server answers nothing at all (it is down, or its queue is stuck), resending the whole
in-flight window every `ack_timeout_s` only fills the broker's queue for it with copies:
measured on RabbitMQ, one device put 378 messages into the up queue in 35 s of silence,
and a fleet with backlogs reaches the queue's byte limit within minutes. So a round that
expires with nothing heard from the server since it was sent doubles the wait, up to
`MAX_FACTOR` times the ack timeout; the first message from the server, a new connection
or the server group announced up again bring it back to the ack timeout.
"""

from __future__ import annotations

MAX_FACTOR = 16
"""The wait grows to at most this many ack timeouts (160 s at the default 10 s)."""


class AnswerWait:
    """The current answer wait of one device's connection."""

    def __init__(self, ack_timeout_s: float, max_factor: int = MAX_FACTOR) -> None:
        self.base = ack_timeout_s
        self.limit = ack_timeout_s * max_factor
        self.current = ack_timeout_s
        self._heard_at = float("-inf")

    def heard(self, now: float) -> None:
        """Something came from the server: it answers; the next round waits the base."""
        self._heard_at = now
        self.current = self.base

    def reset(self) -> None:
        """A new connection, or the server group announced up: start from the base."""
        self.current = self.base

    def expired(self, sent_at: float) -> None:
        """Changes sent at `sent_at` went unanswered for `current`: wait longer next time
        when nothing at all was heard since (not when the server answered other things:
        then this round was lost, not ignored)."""
        if self._heard_at < sent_at:
            self.current = min(self.limit, self.current * 2)


__all__ = ["MAX_FACTOR", "AnswerWait"]
