"""The engine's dead letters (a mixin of `broker.server.engine.Engine`): refusals queued
through the letter gate (`broker.server.letter_gate`) for the next transaction, and the
bounds applied in full every minute (`TRIM_INTERVAL_MS`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import structlog

from broker.server.engine_txn import MAX_PENDING_LETTERS
from broker.server.letter_gate import GateSession, LetterGate
from broker.server.replies import letter
from broker.server.store.base import DeadLetter, DeadLetterStats, Store, WriteTxn
from waystation.config import MergeConfig

log = structlog.get_logger("broker.server.engine")

TRIM_INTERVAL_MS = 60_000
"""How often the dead letters' bounds are applied in full (and their figures read)."""


class DeadLetterQueue:
    """Provides `_queue_letter`, `_done_letters` and `_trim_letters` to `Engine`."""

    store: Store
    cfg: MergeConfig
    gate: LetterGate
    counters: Counter[str]
    now_ms: Callable[[], int]
    _letters: list[DeadLetter]
    dead_letter_stats: DeadLetterStats | None

    def _queue_letter(self, dev: str, topic: str, code: str, reason: str,
                      payload: bytes, size: int | None = None) -> None:
        session = self.gate.session()
        admitted = session.admit(letter(dev, topic, code, reason, payload, self.now_ms(),
                                        size=size))
        self._done_letters(session)
        self._letters.extend(admitted[:max(0, MAX_PENDING_LETTERS - len(self._letters))])

    def _done_letters(self, session: GateSession) -> None:
        self.gate.commit(session)
        self.counters["dead_letters"] += session.seen
        self.counters["dead_letters_counted"] += session.counted

    def _trim_letters(self, now: int) -> None:
        """Apply the dead letters' bounds in full; read their figures for the metrics."""
        dropped, trimmed = self.store.transact(partial(_trim, now=now, cfg=self.cfg))
        if trimmed:
            log.info("conflicts_trimmed", dropped=trimmed)
        with self.store.read() as txn:
            self.dead_letter_stats = txn.dead_letter_stats()
        if dropped:
            log.info("dead_letters_trimmed", dropped=dropped,
                     kept=self.dead_letter_stats.count, bytes=self.dead_letter_stats.bytes)


def _trim(txn: WriteTxn, now: int, cfg: MergeConfig) -> tuple[int, int]:
    """The dead letters' bounds, and the conflict log's (closed entries only)."""
    return (txn.trim_dead_letters(now),
            txn.trim_conflicts(now - cfg.conflict_retention_s * 1000, cfg.conflict_max_closed))


__all__ = ["TRIM_INTERVAL_MS", "DeadLetterQueue"]
