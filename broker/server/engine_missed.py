"""The engine's part in showing devices the deltas they missed (a mixin of
`broker.server.engine.Engine`; the bookkeeping is `broker.server.missed`): what it
learns from up messages, presence, registry reloads and undelivered messages, and the
nudge deltas it sends at its tick."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import structlog

from broker.errors import StoreError
from broker.server.fanout import Outgoing
from broker.server.incoming import Incoming
from broker.server.liveness import Heartbeat
from broker.server.messages import Compression, compress
from broker.server.missed import MissedDeltas
from broker.server.periodic import nudge_messages
from broker.server.presence import Presence
from broker.server.registry import Registry
from broker.server.schema_push import LiveSchema
from broker.server.store.base import Store

log = structlog.get_logger("broker.server.engine")


class MissedNudges:
    """Provides `undelivered`, `_note_missed`, `_note_enabled` and `_nudges` to `Engine`."""

    store: Store
    registry: Registry
    presence: Presence
    counters: Counter[str]
    now_ms: Callable[[], int]
    missed: MissedDeltas
    _disabled: set[str]
    _out_since: int
    _sent_commands: set[str]
    _commands_gen: int
    _schema_owed: set[str]
    heartbeat: Heartbeat
    schema: LiveSchema

    def _compress_over(self, dev: str) -> Compression:
        raise NotImplementedError

    def undelivered(self, dev: str) -> None:
        """A message the engine last returned for `dev` could not be published: the
        device will be shown the gap of any delta lost with it (`broker.server.missed`)."""
        self.missed.undelivered(dev, self._out_since, self.now_ms())
        # So could a `schema` push (sent at a publish, and otherwise only after the
        # device's next hello): offered again once the link is back, if still due.
        if self.registry.get(dev) is not None:  # (an error to an unknown id: none due)
            self._schema_owed.add(dev)
        # A command among them would otherwise wait for the device's next hello, which a
        # device online all along never sends: pushed again at the next tick (a device
        # carries out a command id at most once, §7.9).
        if not self._sent_commands:
            return  # (no store read per refused message while the link is down)
        try:
            with self.store.read() as txn:
                ids = {c.id for c in txn.commands(dev)}
        except StoreError:
            log.exception("undelivered_commands_unread", dev=dev)
            return
        if ids & self._sent_commands:
            self._sent_commands -= ids
            self._commands_gen = -1

    def _note_missed(self, inc: Incoming) -> None:
        """What `self.missed` learns from a handled up message."""
        if inc.failed or inc.error is not None:
            return
        if inc.kind == "catchup" and not inc.blocked:  # not hello: sent after a command too
            self.missed.asked(inc.topic_dev)
        for r in inc.results:
            if r.ok and not r.duplicate:
                self.missed.applied(r.scope, r.q)

    def _note_enabled(self, now: int) -> None:
        """A disabled device gets no deltas, as if offline (`self.missed`); enabled again
        while online, its `sync` command brings a hello but no catch-up."""
        disabled = {row.id for row in self.registry.devices() if not row.enabled}
        for dev in disabled - self._disabled:
            self.missed.offline(dev)
        for dev in self._disabled - disabled:
            if self.presence.is_online(dev) and self.registry.get(dev) is not None:
                self.missed.online(dev, now)
        self._disabled = disabled
        self.missed.forget(lambda dev: self.registry.get(dev) is not None)

    def _receives(self, dev: str) -> Sequence[str]:
        """The scopes whose deltas `dev` gets now (none while offline or disabled)."""
        row = self.registry.active(dev)
        return row.scopes if row is not None and self.presence.is_online(dev) else ()

    def _nudges(self, now: int) -> list[Outgoing]:
        """A delta for each device back online that missed some (`broker.server.missed`):
        only while it is still online, and only of the scopes it still receives."""
        if self.heartbeat.broker_down_ms:
            return []  # (none while the broker link is down: each would be lost again)
        out = self._schema_again()
        if not self.missed.waiting():
            return out
        nudges = self.missed.due(now, self._receives)
        if not nudges:
            return out
        self.counters["missed_nudges"] += len(nudges)
        log.info("missed_deltas_nudged", devices=[n.dev for n in nudges][:20],
                 count=len(nudges))
        return out + [(dev, compress(m, self._compress_over(dev)))
                      for dev, m in nudge_messages(self.store, nudges)]

    def _schema_again(self) -> list[Outgoing]:
        """The `schema` push still due to each device a message could not reach (none
        when it runs the server's version, or does not take pushes)."""
        if not self._schema_owed:
            return []
        rows = [row for dev in self._schema_owed if (row := self.registry.get(dev))]
        self._schema_owed.clear()
        return [(dev, compress(m, self._compress_over(dev)))
                for dev, m in self.schema.pushes(rows, self.presence.online())]


__all__ = ["MissedNudges"]
