"""Retention on the device: evict synced records the schema declares evictable.

The rule is the collection's `retention` (`schemas.retention`): e.g. delivered tasks
seven days after they last synced. A pass walks the base records in key order, a
bounded number per LMDB write transaction (`batch`), resuming where the previous
transaction stopped (meta ``evict_at``), so apps and the sync daemon are never held up
for long. Never evicted: a record with pending writes (its outbox changes need it) or
an open conflict (a person must see it).

Evicting a record removes its base, stamps, view and index entries in one transaction
(queries stay consistent: `Work.save_view` keeps the indexes in step) and leaves an
eviction marker (`agent.evicted`) that keeps catch-up and re-sent deltas from bringing
it back stale. It is a feed event ``evicted``. The record comes back on demand:
`Agent.fetch` (PROTOCOL.md §7.14) or a `resync` command.

Eviction commits are replayable (durable=False): a power loss may undo the last one,
and the next pass does it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent import evicted, quota
from agent.core import Core, Work
from agent.store import split_record_key
from schemas.retention import evictable

META_AT = "evict_at"
"""Hex of the base key the current pass resumes at (absent: the next pass starts over)."""


@dataclass(frozen=True)
class StepResult:
    examined: int
    evicted: int
    finished: bool
    """The pass reached the last record (the next step starts a new pass)."""
    quota: dict[str, Any] | None = None
    """The quota state after the step (agent.quota), None without a quota."""


def _pending(work: Work, rk: bytes) -> bool:
    prefix = b"R" + rk + b"\0"
    with work.tx.cursor("outbox_idx") as cur:
        return bool(cur.set_range(prefix)) and cur.key().startswith(prefix)


def step(core: Core, *, batch: int = 200, pressure: bool | None = None) -> StepResult:
    """One bounded eviction transaction. `pressure` lifts the age condition (the disk
    quota is reached); None: whether the quota is reached at the step's start."""

    def run(work: Work) -> StepResult:
        tx = work.tx
        now = work.now()
        # Recorded before and after: apps learn that the quota was reached (feed event
        # `quota`) even when this very step frees enough to leave it again.
        before = quota.observe(work)
        under_pressure = pressure
        if under_pressure is None:
            under_pressure = bool(before and before["reached"])
        at = tx.meta(META_AT)
        start = bytes.fromhex(at) if isinstance(at, str) else None
        examined = 0
        doomed: list[tuple[bytes, dict[str, Any]]] = []
        unstamped: list[tuple[bytes, dict[str, Any]]] = []
        next_at: bytes | None = None
        for rk, doc in tx.items("base", start=start):
            if examined >= batch:
                next_at = rk
                break
            examined += 1
            c, _ = split_record_key(rk)
            spec = core.spec(c)
            rule = spec.retention if spec is not None else None
            if rule is None:
                continue
            synced = doc.get("st")
            if not isinstance(synced, int):
                # Synced before retention existed: its clock starts now.
                unstamped.append((rk, doc))
                continue
            if evictable(rule, doc["f"], bool(doc["x"]), synced, now,
                         pending=_pending(work, rk), conflicted=bool(doc.get("cf")),
                         pressure=under_pressure):
                doomed.append((rk, doc))
        for rk, doc in unstamped:
            tx.put("base", rk, {**doc, "st": now})
        for rk, doc in doomed:
            c, k = split_record_key(rk)
            work.save_base(rk, work.load_base(rk, c, k), None)
            work.save_view(rk, None)
            tx.put(evicted.DB, rk, {"s": doc["s"], "q": doc["q"], "t": now, "g": work.gen()})
            work.feed(c, k, "evicted")
        if next_at is None:
            tx.delete("meta", META_AT.encode())
        else:
            tx.set_meta(META_AT, next_at.hex())
        state = quota.observe(work)
        return StepResult(examined, len(doomed), next_at is None, state)

    return core.write(run, durable=False)


def run_pass(core: Core, *, batch: int = 200, pressure: bool | None = None) -> int:
    """Steps until the pass reaches the last record; returns the records evicted."""
    total = 0
    while True:
        result = step(core, batch=batch, pressure=pressure)
        total += result.evicted
        if result.finished:
            return total


__all__ = ["META_AT", "StepResult", "run_pass", "step"]
