"""Adaptive batching for the sync daemon: when to send what was written (pure logic).

On an idle link (nothing in flight) a change goes at once: the lone change pays one
round trip and nothing more. While changes are in flight, what is written meanwhile
waits until an answer arrives, or about one round trip passed (the smoothed publish ->
ack time, bounded by `HOLD_MIN_S`..`HOLD_MAX_S`), and then goes as one batch. So
changes written faster than round trips share messages, acks and ack commits instead of
costing one of each per change, and the batch size follows the write rate and the link
by itself: no setting to tune. A whole batch never waits (backlogs drain pipelined).
"""

from __future__ import annotations

from collections.abc import Callable

HOLD_MIN_S = 0.002
HOLD_MAX_S = 0.2
_GAIN = 0.2


class Pacer:
    """The daemon's sending pace (`AgentDaemon._pump` asks `hold` before each send)."""

    __slots__ = ("_batch_max", "_hold_until", "_inflight_at_send", "held", "srtt")

    def __init__(self, batch_max: int, srtt: float = 0.02) -> None:
        self._batch_max = batch_max
        self.srtt = srtt
        """Smoothed publish -> ack time (s)."""
        self._hold_until = 0.0
        self._inflight_at_send = 0
        self.held = 0
        """Times a partial batch waited (for statistics)."""

    def hold(self, now: float, inflight: int, waiting: Callable[[], int]) -> bool:
        """Whether to wait before sending more: `inflight` changes are unanswered,
        `waiting()` counts the changes not yet sent (asked only when it matters)."""
        if inflight == 0 or now >= self._hold_until:
            return False
        if inflight < self._inflight_at_send:
            return False  # an answer came: send what gathered meanwhile
        if waiting() >= self._batch_max:
            return False
        self.held += 1
        return True

    def sent(self, now: float, inflight: int) -> None:
        """A batch went out; `inflight` changes are unanswered now."""
        self._hold_until = now + min(HOLD_MAX_S, max(HOLD_MIN_S, self.srtt))
        self._inflight_at_send = inflight

    def answered(self, rtt: float) -> None:
        """An ack came `rtt` seconds after its change was published."""
        if rtt > 0:
            self.srtt += _GAIN * (min(rtt, 10 * HOLD_MAX_S) - self.srtt)

    def wake_at(self, now: float, other: float) -> float:
        """When the daemon must look again: `other`, or earlier when a hold ends."""
        return min(other, self._hold_until) if self._hold_until > now else other


__all__ = ["HOLD_MAX_S", "HOLD_MIN_S", "Pacer"]
