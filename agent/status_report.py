"""When the daemon publishes its retained `status` (PROTOCOL.md §7.10) besides the
periodic one: the operator's `waystation server devices` shows the outbox count of the
latest report, so a count that stopped being true in a way that matters is reported
soon, not up to `sync.status_interval_s` (30 s) later (pure: times in monotonic s).

What matters: the outbox drained (the device reported changes waiting; now none wait:
"PENDING 5" right after the sync is the lie operators notice), and changes that keep
waiting while the device reported none (held by the sync policy, by a server that does
not answer, ...). A change that waits less than `hold_s` is not reported: a busy device
whose writes are acked in milliseconds would otherwise report at every write. Never more
than one report per `min_gap_s`, whatever the outbox does.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_GAP_S = 1.0
"""At most one prompt report a second: a busy device cannot flood the broker."""
HOLD_S = 1.0
"""Changes waiting this long while the last report said none are worth a report."""


@dataclass(slots=True)
class StatusReports:
    """The latest report sent, and whether the outbox's count calls for another."""

    interval_s: float
    """The periodic report's interval (sync.status_interval_s)."""
    min_gap_s: float = MIN_GAP_S
    hold_s: float = HOLD_S
    last_at: float = float("-inf")
    """When the latest report was sent (-inf: none yet)."""
    reported: int | None = None
    """The outbox count it carried (None: none sent, or it carried none)."""
    waiting_since: float | None = None
    """Since when changes wait while the latest report said none."""

    def sent(self, now: float, pend: int | None) -> None:
        """A status carrying `pend` was published at `now`."""
        self.last_at = now
        self.reported = pend
        self.waiting_since = None

    def periodic_due(self, now: float) -> bool:
        return now - self.last_at >= self.interval_s

    def prompt_due(self, now: float, pend: int) -> bool:
        """Whether the outbox count `pend` (read at `now`) calls for a report before the
        periodic one."""
        if self.reported is None:
            return False  # nothing reported a count: nothing stale to correct
        if self.reported > 0 or pend == 0:
            self.waiting_since = None
            return self.reported > 0 and pend == 0 and now - self.last_at >= self.min_gap_s
        if self.waiting_since is None:
            self.waiting_since = now
        return (now - self.waiting_since >= self.hold_s
                and now - self.last_at >= self.min_gap_s)


__all__ = ["HOLD_S", "MIN_GAP_S", "StatusReports"]
