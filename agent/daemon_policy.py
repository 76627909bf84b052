"""The agent daemon's side of the sync policy: server announcements, "sync now", and
what the policy holds back recorded for the status (`agent.policy`, PROTOCOL.md §7.12).

A mixin of `agent.daemon.AgentDaemon`, kept apart so the daemon's sender and receiver
stay readable; it runs on the daemon's engine thread like everything else there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.answer_wait import AnswerWait
from agent.policy.decide import Decision
from agent.policy.gate import Gate
from agent.sync import Sync
from schemas import codec, wire
from schemas.errors import ProtocolError

log = structlog.get_logger("waystation.agent")

_SERVER_STATE_MAX = 4096
"""Bytes of a server announcement (PROTOCOL.md §7.12); more is refused unread."""


class PolicyHooks:
    """Needs the daemon's `gate`, `sync`, `stats`, `dev` and `server_group`."""

    dev: str
    sync: Sync
    gate: Gate
    server_group: str
    stats: Any
    _decision: Decision | None
    _policy_doc: dict[str, Any] | None
    _policy_written: float
    _budget_dirty: bool
    _connected: bool
    _say_hello: Callable[..., None]
    answer_wait: AnswerWait

    def _on_server_state(self, topic: str, payload: bytes) -> None:
        """A merge server's retained announcement (PROTOCOL.md §7.12)."""
        parts = topic.split("/")
        if (len(parts) != 5 or parts[1] != "_server" or parts[2] != self.server_group
                or parts[4] != "state"):
            log.warning("unexpected_topic", dev=self.dev, topic=topic[:200])
            return
        server = parts[3]
        now_ms = int(time.time() * 1000)
        if not payload:  # the retained announcement was cleared by the operator
            self.gate.on_server_state(server, None, now_ms)
            log.info("server_forgotten", dev=self.dev, server=server)
            return
        try:
            msg = codec.decode(payload, allowed=wire.SERVER_TYPES,
                               max_payload=_SERVER_STATE_MAX)
        except ProtocolError as err:
            self.stats.bad_messages += 1
            log.warning("bad_server_state", dev=self.dev, code=err.code, reason=err.reason)
            return
        assert isinstance(msg, wire.ServerState)
        if msg.srv != server or msg.grp != self.server_group:
            self.stats.bad_messages += 1
            log.warning("bad_server_state", dev=self.dev, code="invalid",
                        reason=f"announcement of {msg.grp}/{msg.srv} on {topic[:200]}")
            return
        was = self.gate.server.up
        self.gate.on_server_state(server, msg.on, msg.t or now_ms)
        if self.gate.server.up != was:
            log.info("server_group", dev=self.dev, group=self.server_group,
                     up=self.gate.server.up, server=server)
            if was is False and self.gate.server.up:
                self.answer_wait.reset()  # a server again: resend at the usual pace
                if self._connected:
                    self._say_hello()  # a restarted server: agree capabilities with it

    def _take_sync_now(self) -> None:
        """Honour the latest "sync now" (app or operator) if it is recent enough."""
        req = self.sync.sync_now_request()
        if req is None or not isinstance(req.get("t"), int):
            return
        before = self.gate.sync_now_until_ms
        self.gate.sync_now(req["t"])
        if self.gate.sync_now_until_ms != before:
            log.info("sync_now", dev=self.dev, by=req.get("by"),
                     until_ms=self.gate.sync_now_until_ms)

    def _note_policy(self, *, force: bool = False) -> None:
        """Record what the policy holds back (meta "policy") when that changed, and the
        metered budget at most every few seconds."""
        decision = self._decision
        if decision is None:
            return
        gate = self.gate
        doc: dict[str, Any] = {
            "deferrals": [d.to_dict() for d in decision.deferrals],
            "sync_now_until_ms": gate.sync_now_until_ms if decision.sync_now else None,
            "server": {"group": self.server_group, "up": gate.server.up,
                       "down_since_ms": gate.server.down_since_ms,
                       "up_since_ms": gate.server.up_since_ms},
            "probes": gate.problems(),
        }
        changed = doc != self._policy_doc
        now = time.monotonic()
        if not (changed or force or (self._budget_dirty and now - self._policy_written >= 5)):
            return
        if changed:
            codes = [d.code for d in decision.deferrals]
            if codes:
                log.info("sync_deferred", dev=self.dev, codes=codes,
                         pending=self.sync.pending_count())
            elif self._policy_doc is not None and self._policy_doc["deferrals"]:
                log.info("sync_resumed", dev=self.dev)
        self._policy_doc = doc
        budget = gate.budget
        self.sync.record_policy({**doc, "budget": {"day": budget.day, "used": budget.used,
                                                   "limit": budget.limit}})
        self._policy_written = now
        self._budget_dirty = False

