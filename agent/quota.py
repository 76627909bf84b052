"""The device's disk quota (storage.quota_bytes).

Measured as the bytes of the LMDB pages holding data (`Tx.live_bytes`), which falls
when records are evicted or the outbox drains; the file itself never shrinks (LMDB
reuses its free pages), so its size would never let a device out of the quota.

At or over the quota: local writes are refused with `QuotaReached` before anything is
stored; everything the server sends is still applied (acks drain the outbox, which
frees room); retention evicts the records its rule declares evictable without waiting
for their age (`agent.evict`). The state is kept in meta ``quota`` and every change of
it is a feed event ``quota`` (apps learn it from the change feed); `agent status`
shows it.
"""

from __future__ import annotations

from typing import Any

from agent.core import Work
from agent.errors import QuotaReached

META_KEY = "quota"


def check_write(work: Work) -> None:
    """Refuse a local write while the quota is reached (call before storing anything)."""
    quota = work.core.settings.quota_bytes
    if quota is None:
        return
    used = work.tx.live_bytes()
    if used >= quota:
        raise QuotaReached(used, quota)


def observe(work: Work) -> dict[str, Any] | None:
    """Record the quota state now (meta ``quota``); a change of `reached` is a feed
    event. Returns the state (None without a quota)."""
    quota = work.core.settings.quota_bytes
    if quota is None:
        if work.tx.has("meta", META_KEY.encode()):
            work.tx.delete("meta", META_KEY.encode())
        return None
    used = work.tx.live_bytes()
    doc = {"limit": quota, "used": used, "reached": used >= quota, "t": work.now()}
    prior = work.tx.meta(META_KEY)
    if prior is None or bool(prior.get("reached")) != doc["reached"]:
        work.feed("", "", "quota", {k: v for k, v in doc.items() if k != "t"})
    work.tx.set_meta(META_KEY, doc)
    return doc


__all__ = ["META_KEY", "check_write", "observe"]
