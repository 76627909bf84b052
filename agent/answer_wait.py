"""How long changes sent wait for the server's answer before they go again (pure).

PROTOCOL.md §9.2: changes not answered within the ack timeout are sent again. While the
server answers nothing at all (it is down, or its queue is stuck), resending the whole
in-flight window every `ack_timeout_s` only fills the broker's queue for it with copies:
measured on RabbitMQ, one device put 378 messages into the up queue in 35 s of silence,
and a fleet with backlogs reaches the queue's byte limit within minutes. The same holds
while the server is *behind*: still answering, but only changes sent before the ones
expiring (a slow link to it, a server catching up after an outage). There every round
went again in full at each ack timeout, because any answer brought the wait back: on a
8 kbit/s link between broker and server, 1,230 duplicates for 450 changes applied.

So the wait follows the server's answers: after each answer to a change in flight it is
twice the time that answer took (at least the ack timeout, at most `MAX_FACTOR` times
it), so a server that keeps up is waited for the ack timeout and one that answers late
is given the time it takes; and a round that expires while nothing sent after it has
been answered doubles the wait (silent, or behind: only older changes answered). A
round that expires while later changes were answered was lost, not ignored: it goes
again at the same wait. A new connection or the server group announced up again bring
the wait back to the ack timeout.
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
        self._answered_sent = float("-inf")
        """When the newest change the server answered was sent."""

    def answered(self, sent_at: float, now: float) -> None:
        """The server answered at `now` a change sent at `sent_at` (its last sending)."""
        self._answered_sent = max(self._answered_sent, sent_at)
        self.current = min(self.limit, max(self.base, 2 * (now - sent_at)))

    def reset(self) -> None:
        """A new connection, or the server group announced up: start from the base."""
        self.current = self.base

    def expired(self, sent_at: float) -> None:
        """Changes sent up to `sent_at` went unanswered for `current`: wait longer next
        time unless a change sent after them was answered (then they were lost; one sent
        with them, in the same turn, does not tell)."""
        if self._answered_sent <= sent_at:
            self.current = min(self.limit, self.current * 2)


__all__ = ["MAX_FACTOR", "AnswerWait"]
