"""Which connectivity changes become feed events (`agent.sync.Sync.record_link`): pure.

Meta "link" follows every change, every retry included (the status shows the latest
reason and when the next attempt is). The feed is what apps read from a saved position,
and it keeps only the newest `agent.core.FEED_KEEP` events: one `retrying` event per
retry let a long outage push the app's own data events (`local`, `synced`, `rejected`)
out of it. With the reconnect backoff's cap (sync.backoff_max_s, 60 s, full jitter: ~30 s
between retries on average) a week offline was ~20,000 retries, twice the whole feed.

So an event is recorded when the state or the `code` changes, at once; an unchanged
online/offline state never again; an unchanged `retrying` at most once per
`RETRY_EVENT_EVERY_S`. Ten minutes: at most 144 events a day, 1,008 a week (a tenth of
the feed; a quiet app's position stays readable for ~70 days of outage), while an app
that shows "reconnecting" still hears from the link at a known, bounded interval (a
count-based doubling would leave hours of silence late in an outage). Nothing is ever
deleted from the middle of the feed: readers take a gap for `truncated`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RETRY_EVENT_EVERY_S = 600.0
"""At most one `retrying` event per this many seconds while the state and code stay."""

TOLD_KEY = "feed_t"
"""Meta "link" field: when (ms) the last feed event of this state and code was recorded."""


def tell(prior: Mapping[str, Any] | None, state: str, code: str, now_ms: int,
         every_s: float = RETRY_EVENT_EVERY_S) -> bool:
    """Whether the link change (`state`, `code`) at `now_ms` is recorded as a feed event,
    given meta "link" as it was before it (`prior`; None: nothing recorded yet)."""
    if prior is None or prior.get("state") != state or prior.get("code") != code:
        return True
    if state != "retrying":
        return False
    told = prior.get(TOLD_KEY, prior.get("t"))  # a store from before: every retry was told
    if not isinstance(told, int):
        return True
    # A wall clock set back (told in the "future") must not silence the feed until it
    # catches up: tell, and count the interval from now.
    return now_ms < told or now_ms - told >= every_s * 1000


def told_at(prior: Mapping[str, Any] | None, told: bool, now_ms: int) -> int:
    """The `TOLD_KEY` to store with the new meta "link"."""
    if told or prior is None:
        return now_ms
    value = prior.get(TOLD_KEY, prior.get("t"))
    return value if isinstance(value, int) else now_ms


__all__ = ["RETRY_EVENT_EVERY_S", "TOLD_KEY", "tell", "told_at"]
