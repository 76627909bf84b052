"""Whether the broker link is delivering, for the timers that wait for an answer (pure).

On a slow link (GPRS/EDGE: 20-60 kbit/s, stalls of seconds) one catch-up page of up to
192 KiB (PROTOCOL.md §7.7) takes a minute or more to arrive, and the device learns of it
only once the whole message is in. Measured through a 32 kbit/s link: a catch-up
retried after `ack_timeout_s` (10 s) while its page was still arriving made the server
send the page again: 51 retries in 10 minutes and the device had not caught up (each copy
queued behind the last). So the timers that wait for an answer (the catch-up retry, the
deaf-link check) count from the latest moment the link was seen delivering, not from
the request: bytes arriving are the answer, or what it queues behind. A deaf link
(`agent.daemon_deaf`) gets a PINGRESP of 2 bytes per keepalive and no more, so only
`PROGRESS_BYTES` or more since the last mark count as progress. How long the wait may
be drawn out is bounded by the caller (`stretched`), so a stream of other messages cannot
hide a request that was lost.
"""

from __future__ import annotations

PROGRESS_BYTES = 1024
"""Bytes in (since the last mark) that show the link is carrying messages, not pings."""


class LinkProgress:
    """The latest moment the link was seen delivering (fed by the daemon's timer)."""

    __slots__ = ("_mark", "at")

    def __init__(self) -> None:
        self._mark = 0
        self.at = float("-inf")
        """When `PROGRESS_BYTES` more had arrived than at the previous mark."""

    def observe(self, now: float, bytes_in: int) -> None:
        """The link has read `bytes_in` bytes in all by `now`."""
        if bytes_in - self._mark >= PROGRESS_BYTES:
            self._mark = bytes_in
            self.at = now
        elif bytes_in < self._mark:  # a new counter (a new link object)
            self._mark = bytes_in

    def stretched(self, since: float, limit_s: float) -> float:
        """When the wait for an answer asked at `since` starts counting: the latest
        progress after it, but never more than `limit_s` after `since`."""
        return min(max(since, self.at), since + limit_s)


__all__ = ["PROGRESS_BYTES", "LinkProgress"]
