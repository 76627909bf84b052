"""The agent daemon's retention and fetch work (a mixin of `agent.daemon.AgentDaemon`).

- Retention (`agent.evict`): one bounded eviction transaction per timer turn while a
  pass is under way; a pass every `retention.interval_s`, and passes back to back while
  the disk quota is reached and they still free something. Runs offline too.
- The acked-change journal (`agent.journal`): expired entries pruned at each pass.
- Fetch (`agent.fetching`, PROTOCOL.md §7.14): queued keys go to the server as `fetch`
  requests, only once its `welcome` agreed to the `fetch` capability; `fetched` answers
  are applied as they come.
- Fetch by query (`agent.fetch_queries`, §7.14.1): the same for queued queries, as
  `fetchq`, once the server agreed to `fetch_query`; `fetchedq` answers are applied as
  they come.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from agent import evict, fetch_queries, fetching, journal, quota
from agent.caps import FETCH, FETCH_QUERY
from agent.core import Work
from agent.errors import StoreDamaged
from agent.sync import Sync
from schemas import wire
from waystation.config import AgentConfig

log = structlog.get_logger("waystation.agent")

_FETCH_IDLE_S = 1.0


class RetentionHooks:
    cfg: AgentConfig
    dev: str
    sync: Sync
    stats: Any
    _connected: bool
    _send: Callable[[wire.Message], bool]
    _evict_next = 0.0
    _evict_running = False
    _evict_freed = 0
    _request_next: dict[str, float] | None = None
    """Capability -> when to look for its next request (`_request_tick`); made per
    daemon at its first turn."""

    def _retention_tick(self, now: float) -> None:
        """One eviction step when one is due (bounded: `retention.batch` records)."""
        rcfg = self.cfg.retention
        if not self._evict_running and now < self._evict_next:
            return
        if not self._evict_running:
            self._prune_journal()
        if not rcfg.enabled:
            # No eviction, but the quota's state still reaches the feed and status.
            self._evict_next = now + rcfg.interval_s
            if self.cfg.storage.quota_bytes is not None:
                try:
                    self.sync.core.write(quota.observe, durable=False)
                except StoreDamaged:
                    raise  # the engine loop says it once and stops (agent.daemon)
                except Exception:
                    log.exception("quota_check_failed", dev=self.dev)
            return
        try:
            result = evict.step(self.sync.core, batch=rcfg.batch)
        except StoreDamaged:
            raise  # the engine loop says it once and stops (agent.daemon)
        except Exception:
            log.exception("eviction_failed", dev=self.dev)
            self._evict_running = False
            self._evict_next = now + rcfg.interval_s
            return
        self._evict_running = not result.finished
        self._evict_freed += result.evicted
        self.stats.extra["evicted"] = self.stats.extra.get("evicted", 0) + result.evicted
        if result.finished:
            if self._evict_freed:
                log.info("records_evicted", dev=self.dev, count=self._evict_freed)
            pressed = bool(result.quota and result.quota["reached"])
            # Under quota pressure, go again at once while passes still free something.
            again = pressed and self._evict_freed > 0
            self._evict_next = now if again else now + rcfg.interval_s
            self._evict_freed = 0

    def _prune_journal(self) -> None:
        """Expire acked changes past the journal's window even when no ack comes (acks
        prune as they add); one bounded transaction per retention pass."""
        core = self.sync.core
        try:
            dropped = core.write(lambda work: journal.prune(work, core.settings.journal),
                                 durable=False)
        except StoreDamaged:
            raise  # the engine loop says it once and stops (agent.daemon)
        except Exception:
            log.exception("journal_prune_failed", dev=self.dev)
            return
        if dropped:
            log.info("journal_pruned", dev=self.dev, count=dropped)

    def _fetch_tick(self, now: float) -> None:
        """Send the next queued fetch request, if the server speaks `fetch`."""
        def take(work: Work) -> wire.Fetch | None:
            return fetching.next_request(work, "f-" + uuid.uuid4().hex[:12])

        self._request_tick(now, FETCH, take, "fetch_failed")

    def _request_tick(self, now: float, cap: str,
                      next_request: Callable[[Work], wire.Message | None],
                      failed_event: str) -> None:
        """Send the next queued request of capability `cap` once the server agreed to it:
        `next_request` takes it from its queue in one write (marking it sent). Requests
        go back to back while some wait; when none does, look again after a pause."""
        if self._request_next is None:
            self._request_next = {}
        timers = self._request_next
        caps = self.sync.server_caps
        if not self._connected or caps is None or cap not in caps or now < timers.get(cap, 0):
            return
        timers[cap] = now + _FETCH_IDLE_S  # nothing to send: look again later
        try:
            request = self.sync.core.write(next_request, durable=False)
        except StoreDamaged:
            raise  # the engine loop says it once and stops (agent.daemon)
        except Exception:
            log.exception(failed_event, dev=self.dev)
            return
        if request is not None:
            self._send(request)
            timers[cap] = time.monotonic()  # more may wait: no pause

    def _on_fetched(self, msg: wire.Fetched) -> None:
        def run(work: Work) -> fetching.FetchedResult:
            return fetching.apply_fetched(work, msg)

        result = self.sync.core.write(run, durable=False)
        log.info("fetched", dev=self.dev, req=msg.req, found=len(result.found),
                 missing=len(result.missing))

    def _fetch_query_tick(self, now: float) -> None:
        """Send the next waiting query, if the server speaks `fetch_query`."""
        self._request_tick(now, FETCH_QUERY, fetch_queries.next_request, "fetch_query_failed")

    def _on_fetched_query(self, msg: wire.FetchedQuery) -> None:
        def run(work: Work) -> fetch_queries.QueryRequest | None:
            return fetch_queries.apply_answer(work, msg)

        req = self.sync.core.write(run, durable=False)
        if req is None:
            log.info("fetched_query_ignored", dev=self.dev, req=msg.req)
        elif msg.end:
            log.info("fetched_query", dev=self.dev, req=msg.req, state=req.state,
                     records=len(req.keys), scanned=req.scanned, stop=req.stop,
                     err=None if req.error is None else req.error["code"])


__all__ = ["RetentionHooks"]
