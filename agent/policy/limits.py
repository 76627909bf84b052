"""Byte limits on the link (pure logic; the caller passes the time).

- `TokenBucket`: a bandwidth cap for one lane. A send is allowed while the bucket is
  not in debt, then its size is taken (possibly into debt: one batch is never split
  for the cap), so the long-run rate is at most `rate` bytes/s and a burst at most
  `burst` bytes plus one batch.
- `DailyBudget`: bytes sent on a metered link per local day; a new day starts at 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TokenBucket:
    rate: float
    """Bytes per second refilled."""
    burst: float
    """Most bytes saved up while idle."""
    tokens: float
    at: float
    """The time `tokens` was measured (seconds, any monotonic origin)."""

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def _refilled(self, now: float) -> float:
        return min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)

    def wait_s(self, now: float) -> float:
        """Seconds until a send is allowed (0: now)."""
        tokens = self._refilled(now)
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def take(self, size: int, now: float) -> TokenBucket:
        """The bucket after sending `size` bytes now."""
        return replace(self, tokens=self._refilled(now) - size, at=max(now, self.at))


@dataclass(frozen=True)
class DailyBudget:
    limit: int | None
    """Bytes per day; None: no limit."""
    day: str = ""
    """The local day (YYYY-MM-DD) `used` counts."""
    used: int = 0

    def spent(self, today: str) -> int:
        return self.used if today == self.day else 0

    def left(self, today: str) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.spent(today))

    def add(self, size: int, today: str) -> DailyBudget:
        return replace(self, day=today, used=self.spent(today) + size)


__all__ = ["DailyBudget", "TokenBucket"]
