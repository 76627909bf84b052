"""The engine's periodic chores that read the store: commands issued while devices are
online, operator resolutions queued as notices (see `broker.server.operations`), and
the nudges of devices back online that missed deltas (`broker.server.missed`)."""

from __future__ import annotations

from collections.abc import Callable

from broker.server.fanout import Fanout
from broker.server.messages import delta_messages, dumps, whole_rec
from broker.server.missed import Nudge
from broker.server.presence import Presence
from broker.server.registry import Registry, deliverable
from broker.server.store.base import CommandRow, Store, WriteTxn

NOTICE_BATCH = 1000


def unsent_commands(store: Store, registry: Registry, presence: Presence,
                    sent: set[str]) -> list[CommandRow]:
    """Pending commands of online devices not sent yet (added to `sent`); disabled
    devices included: a wipe must reach a device that was disabled first."""
    out: list[CommandRow] = []
    with store.read() as txn:
        for dev in sorted(presence.online()):
            row = registry.get(dev)
            if row is None:
                continue
            cmds = [c for c in txn.commands(dev)
                    if not c.done_ms and c.id not in sent and deliverable(c, row.caps)]
            for cmd in sorted(cmds, key=lambda c: c.cmd != "wipe"):  # a wipe goes first
                sent.add(cmd.id)
                out.append(cmd)
    return out


def drain_notices(store: Store, fan: Fanout, limit: int = NOTICE_BATCH,
                  generation: int | None = None,
                  applied: Callable[[str, int], None] | None = None) -> int:
    """Queue the stored notices' record states on `fan` and delete them; returns how many.

    Delivery is at most once per notice: a device that misses the delta sees a gap in
    its sequence, or catches up at its next reconnect. With `generation` (the registry
    generation the caller's schema was loaded at), nothing is drained from a snapshot
    where it moved (a publish rewrote the notices in names the caller does not run
    yet): the next tick reloads first.
    """
    with store.read() as txn:
        if generation is not None and txn.registry_generation() != generation:
            return 0
        notices = txn.notices(limit)
    if not notices:
        return 0
    for notice in notices:
        fan.add(notice.scope, None, dumps(notice.rec))
        if applied is not None:
            applied(notice.scope, notice.q)

    def drop(txn: WriteTxn) -> None:
        for notice in notices:
            txn.delete_notice(notice.id)

    store.transact(drop)
    return len(notices)


def nudge_messages(store: Store, nudges: list[Nudge]) -> list[tuple[str, bytes]]:
    """For each nudge, one `delta` with the record at or after each scope's last
    sequence (the first one the index holds from there: the record itself, or a newer
    version of the scope when it moved again)."""
    out: list[tuple[str, bytes]] = []
    with store.read() as txn:
        for nudge in nudges:
            recs: list[bytes] = []
            for scope, q in nudge.scopes:
                for _, c, k in txn.index_range(scope, q - 1, 1):
                    raw = txn.get_record(c, k)
                    if raw is not None:
                        recs.append(whole_rec(raw))
            out.extend((nudge.dev, m) for m in delta_messages(recs))
    return out


__all__ = ["drain_notices", "nudge_messages", "unsent_commands"]
