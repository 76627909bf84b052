"""Reading the store's feed: the events every write, ack, rejection, delta and link
change appends in its own transaction (`agent.core.Work.feed`).

An event is stored as ``[collection, key, kind]`` or ``[collection, key, kind, data]``
under its seq (8 bytes, big-endian); the newest `agent.core.FEED_KEEP` are kept. A reader
that asks for events after a seq that was already pruned gets a "truncated" event first.
"""

from __future__ import annotations

from agent.core import Work
from agent.models import FeedEvent
from agent.store import n_key


def position(work: Work) -> int:
    """The seq of the newest feed event (0: none yet)."""
    return int(work.tx.meta("ctr", [1, 0, 0, 0])[3])


def read_after(work: Work, last: int, limit: int) -> list[FeedEvent]:
    """Up to `limit` events after seq `last`, oldest first; a "truncated" event (seq one
    below the first one kept) first when events after `last` were pruned unseen."""
    out: list[FeedEvent] = []
    first = True
    for raw, doc in work.tx.items("feed", start=n_key(last + 1)):
        seq = int.from_bytes(raw, "big")
        if first and seq > last + 1 and last > 0:
            out.append(FeedEvent(seq - 1, "", "", "truncated", {"after": last}))
        first = False
        out.append(FeedEvent(seq, doc[0], doc[1], doc[2], doc[3] if len(doc) > 3 else {}))
        if len(out) >= limit:
            break
    return out


__all__ = ["position", "read_after"]
