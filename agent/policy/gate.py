"""The daemon's policy gate: config, clocks, probes and limits in, a `Decision` out.

Holds the little state the pure parts need (token buckets, the day's budget, the
server group's announcements, an explicit "sync now") and caches a decision for a
second, so the daemon's hot path asks cheaply; anything that changes the answer
(sync now, an announcement) drops the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from agent.policy.decide import LANES, Battery, Conditions, Decision, Lane, Rules, decide
from agent.policy.limits import DailyBudget, TokenBucket
from agent.policy.probes import Probe, battery_probe, metered_probe
from agent.policy.server import ServerWatch
from agent.policy.windows import is_open, parse_windows, seconds_until_change, week_second
from waystation.config.policy import PolicyConfig

_CACHE_S = 1.0


def _wall_ms() -> int:
    return int(time.time() * 1000)


class Gate:
    def __init__(self, cfg: PolicyConfig, *, wall_ms: Callable[[], int] = _wall_ms,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._wall_ms = wall_ms
        self._mono = mono
        self.rules = Rules(high_priority=cfg.high_priority,
                           metered_lanes=frozenset(cfg.metered.lanes),
                           battery_min_percent=cfg.battery.min_percent)
        self.windows = parse_windows(cfg.windows)
        self._tz: tzinfo | None = ZoneInfo(cfg.timezone) if cfg.timezone else None
        m = cfg.metered
        self.metered: Probe[bool] | None = (
            metered_probe(file=m.file, command=m.command, value=m.value,
                          timeout_s=m.timeout_s, interval_s=m.interval_s)
            if (m.file or m.command or m.value is not None) else None)
        b = cfg.battery
        self.battery: Probe[Battery] | None = (
            battery_probe(file=b.file, command=b.command, sysfs=b.sysfs,
                          timeout_s=b.timeout_s, interval_s=b.interval_s)
            if b.min_percent is not None else None)
        bw = cfg.bandwidth
        rates: dict[Lane, int | None] = {"records": bw.records_bytes_per_s,
                                         "files": bw.files_bytes_per_s,
                                         "telemetry": bw.telemetry_bytes_per_s}
        now = mono()
        self.buckets: dict[Lane, TokenBucket] = {
            lane: TokenBucket.full(rate, rate * bw.burst_s, now)
            for lane, rate in rates.items() if rate is not None}
        self.budget = DailyBudget(m.daily_bytes)
        self.server = ServerWatch()
        self.sync_now_until_ms: int | None = None
        self._cached: tuple[float, Decision] | None = None
        self._metered_now: bool | None = None

    # ------------------------------------------------------------------ inputs

    def local(self, ms: int) -> datetime:
        moment = datetime.fromtimestamp(ms / 1000, self._tz)
        return moment if self._tz is not None else moment.astimezone()

    def today(self, ms: int | None = None) -> str:
        return self.local(self._wall_ms() if ms is None else ms).date().isoformat()

    def sync_now(self, since_ms: int) -> None:
        """An explicit "sync now" given at `since_ms`: limits lifted for sync_now_s."""
        until = since_ms + int(self.cfg.sync_now_s * 1000)
        if self.sync_now_until_ms is None or until > self.sync_now_until_ms:
            self.sync_now_until_ms = until
        self._cached = None

    def on_server_state(self, server: str, online: bool | None, t_ms: int) -> None:
        if online is None:
            self.server.forget(server)
        else:
            self.server.on_state(server, online, t_ms)
        self._cached = None

    def restore_budget(self, doc: Any) -> None:
        if isinstance(doc, dict) and isinstance(doc.get("day"), str) and isinstance(
                doc.get("used"), int):
            self.budget = DailyBudget(self.budget.limit, doc["day"], doc["used"])

    # ---------------------------------------------------------------- deciding

    def conditions(self) -> Conditions:
        now_ms = self._wall_ms()
        local = self.local(now_ms)
        at = week_second(local)
        ahead = seconds_until_change(self.windows, at)
        metered = self.metered.ask() if self.metered is not None else None
        self._metered_now = metered
        today = local.date().isoformat()
        midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(),
                                    local.tzinfo)
        server_up = self.server.up if self.cfg.wait_for_server else None
        return Conditions(
            now_ms=now_ms, window_open=is_open(self.windows, at),
            window_change_ms=None if ahead is None else (now_ms // 1000 + ahead) * 1000,
            metered=metered, budget_left=self.budget.left(today),
            budget_resets_ms=int(midnight.timestamp() * 1000),
            battery=self.battery.ask() if self.battery is not None else None,
            server_up=server_up, server_down_since_ms=self.server.down_since_ms,
            sync_now_until_ms=self.sync_now_until_ms)

    def decide(self) -> Decision:
        now = self._mono()
        if self._cached is not None and now - self._cached[0] < _CACHE_S:
            return self._cached[1]
        decision = decide(self.rules, self.conditions())
        self._cached = (now, decision)
        return decision

    def problems(self) -> dict[str, str]:
        """Probes that failed on their last question (for the status)."""
        out = {}
        for name, probe in (("metered", self.metered), ("battery", self.battery)):
            if probe is not None and probe.problem:
                out[name] = probe.problem
        return out

    # --------------------------------------------------------------- sending

    def wait_s(self, lane: Lane) -> float:
        """Seconds the lane's bandwidth cap holds the next send (0: send now)."""
        bucket = self.buckets.get(lane)
        return 0.0 if bucket is None else bucket.wait_s(self._mono())

    def sent(self, lane: Lane, size: int) -> bool:
        """Count `size` bytes sent on `lane`; True when the day's metered budget moved
        (the caller persists it)."""
        bucket = self.buckets.get(lane)
        if bucket is not None:
            self.buckets[lane] = bucket.take(size, self._mono())
        if self._metered_now and self.budget.limit is not None:
            before = self.budget.left(self.today())
            self.budget = self.budget.add(size, self.today())
            if (self.budget.left(self.today()) or 0) <= 0 < (before or 0):
                self._cached = None  # just spent: decide again now
            return True
        return False


__all__ = ["LANES", "Gate"]
