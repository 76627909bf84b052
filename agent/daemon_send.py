"""The daemon's sender (a mixin of `agent.daemon.AgentDaemon`): what goes in each
`changes` batch and when (the sync policy's lanes, the pacer's adaptive batching, the
in-flight window), and when what is in flight has waited long enough to go again
(`agent.answer_wait`). Runs on the daemon's engine thread like everything else there."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from agent.answer_wait import AnswerWait
from agent.pacing import Pacer
from agent.policy.decide import Decision
from agent.policy.gate import Gate
from agent.sync import Sync
from waystation.config import AgentConfig
from waystation.mqtt import MqttLink


class SendHooks:
    """Provides `_pump`, `_note_rtt` and `_inflight_room` to `AgentDaemon`."""

    cfg: AgentConfig
    sync: Sync
    gate: Gate
    link: MqttLink
    pacer: Pacer
    answer_wait: AnswerWait
    stats: Any
    up_topic: str
    _connected: bool
    _inflight: dict[int, float]
    _first_sent: dict[int, float]
    _earliest: float
    _retry_at: dict[int, float]
    _may_send: bool
    _decision: Decision | None
    _budget_dirty: bool
    _wake_sock: Any
    _note_policy: Callable[..., None]
    _asked: Callable[[float], None]
    _txn_on: Callable[[], bool | None]

    def _pump(self, now: float) -> None:
        if not self._connected:
            return
        sync_cfg = self.cfg.sync
        wait = self.answer_wait.current
        if now >= self._earliest + wait:  # else nothing can have expired: no scan of them
            expired = [n for n, sent in self._inflight.items() if sent + wait <= now]
            if expired:
                self.answer_wait.expired(max(self._inflight[n] for n in expired))
            for n in expired:
                del self._inflight[n]
                self.stats.resent += 1
                self._may_send = True
            self._earliest = min(self._inflight.values(), default=float("inf"))
        if self.sync.upgrade_needed:
            return  # the server cannot read this device's changes until it is upgraded
        decision = self.gate.decide()
        if decision is not self._decision:
            self._decision = decision
            self._may_send = True
            self._note_policy()
        if "records" in decision.lanes:
            min_priority: int | None = None
        elif decision.high_priority:
            min_priority = self.cfg.policy.high_priority  # only urgent changes go
        else:
            return
        if not self._may_send and self._wake_sock is not None:
            return  # (without the wake socket, every turn looks: writes are polled)
        room = sync_cfg.max_inflight_changes - len(self._inflight)
        if self.pacer.hold(now, len(self._inflight),
                           lambda: self.sync.pending_count() - len(self._inflight)):
            self.stats.held = self.pacer.held
            return
        while room > 0 and self.gate.wait_s("records") == 0:
            waiting = [n for n, t in self._retry_at.items() if t > now]
            # Without deferred changes, the in-flight numbers themselves (not a copy).
            exclude: AbstractSet[int] = (
                self._inflight.keys() if not waiting else {*self._inflight, *waiting})
            batch = self.sync.next_batch(exclude, min(sync_cfg.batch_max_changes, room),
                                         sync_cfg.batch_max_bytes, txn=self._txn_on(),
                                         min_priority=min_priority)
            if not batch:
                if batch.exhausted:
                    self._may_send = False
                return
            payload = self.sync.changes_payload(batch, sync_cfg.compress_over_bytes or None)
            if not self.link.publish(self.up_topic, payload):
                return
            if self.gate.sent("records", len(payload)):
                self._budget_dirty = True
            self._asked(now)
            self._earliest = min(self._earliest, now)
            first = self._first_sent
            if len(first) > 4 * sync_cfg.max_inflight_changes:  # (answered some other way)
                for n in [n for n in first if n not in self._inflight]:
                    del first[n]
            for n in batch.numbers:
                self._inflight[n] = now
                first.setdefault(n, now)
                self._retry_at.pop(n, None)
            self.pacer.sent(now, len(self._inflight))
            self.stats.batches_sent += 1
            self.stats.changes_sent += len(batch)
            room -= len(batch)
            if batch.exhausted:  # nothing else to send: no second scan to find that out
                self._may_send = False
                return

    def _note_rtt(self, sent: float) -> None:
        """An ack for a change sent at `sent` (agent.pacing, agent.answer_wait)."""
        now = time.monotonic()
        self.pacer.answered(now - sent)
        self.answer_wait.answered(sent, now)

    def _inflight_room(self) -> bool:
        """Room in the in-flight window for a whole batch (refilling smaller gaps as they
        open would split the backlog into ever smaller batches)."""
        sync_cfg = self.cfg.sync
        room = sync_cfg.max_inflight_changes - len(self._inflight)
        return self._connected and room >= sync_cfg.batch_max_changes


__all__ = ["SendHooks"]
