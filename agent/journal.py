"""The journal of acked changes: what a restored server gets back (PROTOCOL.md §9.7).

When the server acks a change, the change leaves the outbox; without a copy, a server
restored from a backup older than the ack would never see it again, and the device's
resync snapshot would erase it from the device's view too. So the ack moves the outbox
entry into the ``journal`` database (key: `n`, value: the entry as it was sent, plus the
scope and sequence `q` the ack gave it and when it was acked), in the ack's own
transaction. The journal keeps `sync.acked_journal_days` of acks and at most
`sync.acked_journal_max_mb` bytes; older entries are pruned from the lowest `n` up, a
bounded number per transaction.

A `resync` command ordered by a restore carries, per scope, the sequence the restored
store had reached (`args.seqs`). `replay` then moves back into the outbox every journaled
change whose `q` is above it (or whose scope the restored store does not know), with
its change id, stamps and transaction unit untouched: the restored server has not seen
those ids and applies them; a change it did see is answered as a duplicate.

The selection (`select`) is pure; the rest works inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from agent.store import n_key, record_key
from waystation.atrest.rewrite import kill_point

if TYPE_CHECKING:
    from agent.core import Work

DB = "journal"
META_KEY = "journal"
"""meta: {"b": bytes held, "c": entries held} (kept in step with the database)."""
REPLAY_KEY = "replay"
"""meta: the last replay after a restore ({t, id, changes, units_skipped, scopes, last_n,
settled}): `last_n` the highest change number sent again, `settled` (ms) when none of
them was left in the outbox any more (acked again, or refused into the dead letters)."""
REPLAY_NEWS_MS = 24 * 3_600_000
"""How long `agent status` keeps saying a restore made the device send acked changes
again, once they have all left the outbox: news for a day, then history (--json)."""
MAX_SEQ = 2**53 - 1
_PRUNE_MIN = 32
"""Old entries a prune may drop per transaction, besides two per entry added."""


@dataclass(frozen=True, slots=True)
class Limits:
    """How much the journal keeps (0 ms: no journal at all)."""

    keep_ms: int
    max_bytes: int


DEFAULT_LIMITS = Limits(7 * 86_400_000, 32 << 20)
"""sync.acked_journal_days = 7, sync.acked_journal_max_mb = 32."""


@dataclass(frozen=True, slots=True)
class Journaled:
    """What `select` needs of one journal entry."""

    n: int
    s: str
    q: int
    x: tuple[int, int] | None = None
    """The transaction unit (first n, count) the change belongs to, if any."""


@dataclass(frozen=True, slots=True)
class Selection:
    replay: list[int] = field(default_factory=list)
    """Change numbers to move back into the outbox, in ascending order."""
    incomplete_units: list[int] = field(default_factory=list)
    """First numbers of units that would be replayed but lack members (pruned)."""


def parse_seqs(args: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The restored store's sequences from a resync's args, or None when there are none
    (a server from before §9.7) or they are malformed (then nothing is replayed: a
    guess could apply a change twice)."""
    if not args or args.get("why") != "restore":
        return None
    raw = args.get("seqs")
    if not isinstance(raw, dict) or len(raw) > 100_000:
        return None
    out: dict[str, int] = {}
    for scope, seq in raw.items():
        if (not isinstance(scope, str) or not scope or len(scope) > 128
                or type(seq) is not int or not 0 <= seq <= MAX_SEQ):
            return None
        out[scope] = seq
    return out


def select(entries: Iterable[Journaled], restored: Mapping[str, int],
           pending: Iterable[int] = ()) -> Selection:
    """The changes a restored server lacks: `q` above the scope's restored sequence, or a
    scope it does not know. A transaction unit goes back whole (its members in the
    journal and those still `pending` in the outbox) or, when members are missing, not
    at all (the server applies a unit whole or refuses it)."""
    chosen: set[int] = set()
    units: dict[int, tuple[int, list[int]]] = {}
    held = set(pending)
    for e in entries:
        if e.x is not None:
            units.setdefault(e.x[0], (e.x[1], []))[1].append(e.n)
        seq = restored.get(e.s)
        if seq is None or e.q > seq:
            chosen.add(e.n)
    skipped: list[int] = []
    for first, (count, members) in units.items():
        if not chosen.intersection(members):
            continue
        present = set(members) | {n for n in range(first, first + count) if n in held}
        if len(present) != count or not all(first <= n < first + count for n in present):
            chosen.difference_update(members)
            skipped.append(first)
        else:
            chosen.update(members)
    return Selection(sorted(chosen), sorted(skipped))


# --------------------------------------------------------------- in a transaction


class Keeper:
    """Journals the changes one ack applies (`add` per change, `close` once)."""

    __slots__ = ("_added", "_bytes", "_limits", "_work")

    def __init__(self, work: Work, limits: Limits) -> None:
        self._work = work
        self._limits = limits
        self._added = 0
        self._bytes = 0

    def add(self, n: int, entry: Mapping[str, Any], scope: str, q: int) -> None:
        if self._limits.keep_ms <= 0 or q <= 0:
            return  # no journal; q 0: the server no longer knew when it applied it
        doc = {"e": {k: v for k, v in entry.items() if k not in ("at", "err", "et")},
               "s": scope, "q": q, "a": self._work.now()}
        size = self._work.tx.put(DB, n_key(n), doc)  # its JSON size: encoded once
        self._added += 1
        self._bytes += size

    def close(self) -> None:
        if not self._added:
            return
        meta = self._work.tx.meta(META_KEY) or {"b": 0, "c": 0}
        meta = {"b": meta["b"] + self._bytes, "c": meta["c"] + self._added}
        _prune(self._work, self._limits, meta, 2 * self._added + _PRUNE_MIN)
        self._work.tx.set_meta(META_KEY, meta)


def prune(work: Work, limits: Limits, budget: int = 1000) -> int:
    """Drop up to `budget` entries past the window or the byte cap; returns how many
    (the whole journal when it is switched off)."""
    meta = work.tx.meta(META_KEY)
    if meta is None:
        return 0
    dropped = _prune(work, limits, meta, budget)
    if dropped:
        work.tx.set_meta(META_KEY, meta)
    return dropped


def _prune(work: Work, limits: Limits, meta: dict[str, int], budget: int) -> int:
    """Drop the oldest entries (lowest n) while past the window or over the cap; adjusts
    `meta` in place."""
    tx = work.tx
    cutoff = work.now() - limits.keep_ms
    drop: list[tuple[bytes, int]] = []
    over = meta["b"] - limits.max_bytes
    if limits.keep_ms > 0 and over <= 0:
        oldest = _oldest_acked(work)
        if oldest is None or oldest >= cutoff:  # the usual ack: nothing to drop
            if meta["c"] <= 0:
                meta["b"] = meta["c"] = 0
            return 0
    for key, doc in tx.items(DB):
        if len(drop) >= budget:
            break
        if limits.keep_ms > 0 and over <= 0 and doc["a"] >= cutoff:
            break  # from the lowest n up: acks come roughly in n order
        size = len(orjson.dumps(doc))
        drop.append((key, size))
        over -= size
    for key, size in drop:
        tx.delete(DB, key)
        meta["b"] -= size
        meta["c"] -= 1
    if meta["c"] <= 0:  # (in place: the caller writes `meta` back)
        meta["b"] = meta["c"] = 0
    return len(drop)


_oldest_seen: tuple[bytes, bytes, int] | None = None
"""The journal's first entry as last read (key, stored bytes) and its acked time: every
ack checks it, and it changes only when entries are pruned or replayed. Keyed on the
stored bytes (sealed ones differ on every write), so a stale time is never used."""


def _oldest_acked(work: Work) -> int | None:
    """When the oldest journal entry was acked (ms), or None when the journal is empty."""
    global _oldest_seen
    tx = work.tx
    with tx.cursor(DB) as cur:
        if not cur.first():
            return None
        key, raw = cur.item()
    seen = _oldest_seen
    if seen is not None and seen[0] == key and seen[1] == raw:
        return seen[2]
    acked: int = tx.get(DB, key)["a"]
    _oldest_seen = (key, raw, acked)
    return acked


@dataclass(frozen=True, slots=True)
class Replayed:
    changes: int
    units_skipped: int
    scopes: dict[str, int]
    """Changes moved back per scope."""


def replay(work: Work, restored: Mapping[str, int], command_id: str) -> Replayed:
    """Move the journaled changes the restored server lacks back into the outbox (see
    the module docstring), in the caller's transaction; record what was done."""
    tx = work.tx
    # Two passes, so that memory holds the few members `select` needs per entry, not
    # the whole journal (up to its byte cap).
    entries = [Journaled(int.from_bytes(key, "big"), d["s"], d["q"], _unit(d["e"]))
               for key, d in tx.items(DB)]
    pending = [int.from_bytes(key, "big") for key in tx.keys("outbox")]
    chosen = select(entries, restored, pending)
    del entries
    per_scope: dict[str, int] = {}
    freed = 0
    floor = tx.meta("sv_floor")  # as `Sync.apply_schema_versions` did to the outbox
    sv_min = int(floor[1]) if floor else 0
    for n in chosen.replay:
        doc = tx.get(DB, n_key(n))
        entry = {**doc["e"], "at": 0, "err": None}
        if entry["sv"] < sv_min:
            entry["sv"] = sv_min
        ch = entry["ch"]
        nk = n_key(n)
        tx.put("outbox", nk, entry)
        # The outbox's index keys (agent.core.prio_key, rec_index_key).
        tx.put_raw("outbox_idx", b"P" + ((2**31 - 1) - entry["p"]).to_bytes(4, "big") + nk)
        tx.put_raw("outbox_idx", b"R" + record_key(ch["c"], ch["k"]) + b"\0" + nk)
        tx.delete(DB, nk)
        freed += len(orjson.dumps(doc))
        per_scope[doc["s"]] = per_scope.get(doc["s"], 0) + 1
    kill_point("replay")  # crash tests: a kill -9 here commits none of it
    if chosen.replay:
        meta = tx.meta(META_KEY) or {"b": 0, "c": 0}
        left = meta["c"] - len(chosen.replay)
        tx.set_meta(META_KEY, {"b": max(0, meta["b"] - freed) if left > 0 else 0,
                               "c": max(0, left)})
    done = Replayed(len(chosen.replay), len(chosen.incomplete_units), per_scope)
    now = work.now()
    record: dict[str, Any] = {"t": now, "id": command_id, "changes": done.changes,
                              "units_skipped": done.units_skipped, "scopes": per_scope}
    if chosen.replay:
        record["last_n"] = chosen.replay[-1]
    else:
        record["settled"] = now  # nothing to send again: over at once
    tx.set_meta(REPLAY_KEY, record)
    return done


def resending(work: Work, doc: Mapping[str, Any]) -> bool:
    """Changes a replay (`doc`, the REPLAY_KEY meta) sent again are still in the outbox.
    Judged by change number: the outbox holds one at or below the highest one replayed
    (a change pending since before the restore, below it, counts too: the server lacks
    it as well)."""
    last = doc.get("last_n")
    if "settled" in doc or not isinstance(last, int):
        return False
    with work.tx.cursor("outbox") as cur:
        return bool(cur.first()) and int.from_bytes(cur.key(), "big") <= last


def note_settled(work: Work) -> None:
    """Record when the last replay's changes have all left the outbox (call in the
    transaction that removed outbox entries: an ack, a refusal). One meta read when
    there is nothing to record."""
    doc = work.tx.meta(REPLAY_KEY)
    if doc is None or "settled" in doc or resending(work, doc):
        return
    work.tx.set_meta(REPLAY_KEY, {**doc, "settled": work.now()})


def replay_news(doc: Mapping[str, Any] | None, resend: bool,
                now: int) -> dict[str, Any] | None:
    """The replay as `agent status` shows it: `doc` plus `resending` (some of its changes
    still wait for the server), `settled` (ms, or None while resending) and `past` (over
    for REPLAY_NEWS_MS: no longer in the status line). A record from before `settled`
    was kept counts from the replay's own time."""
    if doc is None:
        return None
    settled = None if resend else int(doc.get("settled", doc["t"]))
    return {**doc, "resending": resend, "settled": settled,
            "past": settled is not None and now - settled > REPLAY_NEWS_MS}


def stats(work: Work) -> dict[str, int]:
    """{"changes", "bytes"} held in the journal."""
    meta = work.tx.meta(META_KEY) or {"b": 0, "c": 0}
    return {"changes": int(meta["c"]), "bytes": int(meta["b"])}


def _unit(entry: Mapping[str, Any]) -> tuple[int, int] | None:
    x = entry.get("x")
    return None if not x else (int(x[0]), int(x[1]))


__all__ = ["DB", "DEFAULT_LIMITS", "META_KEY", "REPLAY_KEY", "REPLAY_NEWS_MS", "Journaled",
           "Keeper", "Limits", "Replayed", "Selection", "note_settled", "parse_seqs", "prune",
           "replay", "replay_news", "resending", "select", "stats"]
