"""When the embedded broker stops checking passwords from a source (pure; the amqtt hook
is `broker.embedded.conn_guard`).

Without it a host could try passwords as fast as the broker answers, and with a slow
hash (an operator's raised ``iterations``) every try also cost the broker's one event
loop that hash, so a flood stalled every device (measured: bench/login_flood.py).

Two tables, each a capped LRU whose entries are forgotten when their window is over:

- **per (source, username)**: after `LoginLimits.failures` failed logins of one
  username from one source, that pair is refused (CONNACK "not authorized", no password
  checked, so a right guess is refused too) for a backoff that doubles with each further
  failure (1 s, 2 s, ... up to `backoff_max_s`); a success forgets the pair. Why not per
  username alone: then anyone anywhere could lock any device out by failing its
  username. Per pair, a guesser only slows itself; an honest device elsewhere never
  notices, and one behind the guesser's NAT address is slowed only for the username
  being guessed (its own: for devices username == client id).
- **per source**: after `source_failures` failed logins of any usernames from one
  source within `SOURCE_WINDOW_S`, the source is refused until that window ends (a
  spray of many usernames, each under the per-pair count). A username that logged in
  from that source before (`KNOWN_GOOD_S`) is still let in, so devices that share a NAT
  address with a guesser keep reconnecting; a device never seen there waits out the
  window.

Memory: each table holds at most `TABLE_MAX` entries: a flood of distinct usernames or
addresses evicts the least recently used (which can only shorten a backoff: the
per-source count still catches a spray from one source).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["KNOWN_GOOD_S", "SOURCE_WINDOW_S", "TABLE_MAX", "LoginGuard", "LoginLimits"]

LOGIN_FAILURES = 5
"""Default: failed logins of one username from one source before its backoff starts."""
BACKOFF_MAX_S = 300.0
"""Default: the longest backoff of one (source, username)."""
SOURCE_FAILURES = 100
"""Default: failed logins from one source in `SOURCE_WINDOW_S` before it is refused."""
SOURCE_WINDOW_S = 60.0
KNOWN_GOOD_S = 7 * 24 * 3600.0
"""A successful login lets its username past its source's lockout this long."""
TABLE_MAX = 10_000
"""Entries of each table (pairs, sources, known-good pairs)."""
BACKOFF_FIRST_S = 1.0


@dataclass(frozen=True)
class LoginLimits:
    """The bounds (see the module docstring)."""

    failures: int = LOGIN_FAILURES
    backoff_max_s: float = BACKOFF_MAX_S
    source_failures: int = SOURCE_FAILURES
    table_max: int = TABLE_MAX


@dataclass
class _Pair:
    failures: int = 0
    until: float = 0.0
    """Refused before this time."""
    last: float = 0.0


@dataclass
class _Source:
    start: float
    failures: int = 0


class LoginGuard:
    """Decides, before a password is checked, whether to check it at all."""

    def __init__(self, limits: LoginLimits | None = None) -> None:
        self.limits = limits or LoginLimits()
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._good: OrderedDict[tuple[str, str], float] = OrderedDict()

    def sizes(self) -> tuple[int, int, int]:
        """Entries held: (pairs, sources, known-good pairs)."""
        return len(self._pairs), len(self._sources), len(self._good)

    def refusal(self, source: str, user: str, now: float) -> str | None:
        """Why a login of `user` from `source` is refused without checking its password
        (None: check it)."""
        self._expire(now)
        pair = self._pairs.get((source, user))
        if pair is not None and now < pair.until:
            return (f"{pair.failures} failed logins of this username from this address: "
                    f"refused for {pair.until - now:.0f} s more")
        src = self._sources.get(source)
        if src is not None and src.failures >= self.limits.source_failures \
                and now - src.start < SOURCE_WINDOW_S and (source, user) not in self._good:
            return (f"{src.failures} failed logins from this address: refused for "
                    f"{src.start + SOURCE_WINDOW_S - now:.0f} s more")
        return None

    def failed(self, source: str, user: str, now: float) -> None:
        """A password (or the rest of a CONNECT) was checked and refused."""
        key = (source, user)
        pair = self._pairs.pop(key, None) or _Pair()
        pair.failures += 1
        pair.last = now
        over = pair.failures - self.limits.failures
        if over >= 0:
            pair.until = now + min(BACKOFF_FIRST_S * 2.0 ** min(over, 60),
                                   self.limits.backoff_max_s)
        self._pairs[key] = pair
        src = self._sources.pop(source, None)
        if src is None or now - src.start >= SOURCE_WINDOW_S:
            src = _Source(start=now)
        src.failures += 1
        self._sources[source] = src
        self._cap()

    def succeeded(self, source: str, user: str, now: float) -> None:
        """A login was accepted: forget its failures, remember it as known good."""
        key = (source, user)
        self._pairs.pop(key, None)
        self._good.pop(key, None)
        self._good[key] = now
        self._cap()

    def _expire(self, now: float) -> None:
        # Each table is in order of last change, so what has expired is at its front.
        window = max(self.limits.backoff_max_s, SOURCE_WINDOW_S)
        while self._pairs:
            key, pair = next(iter(self._pairs.items()))
            if now < pair.until or now - pair.last < window:
                break
            del self._pairs[key]
        while self._sources:
            source, src = next(iter(self._sources.items()))
            if now - src.start < SOURCE_WINDOW_S:
                break
            del self._sources[source]
        while self._good:
            key, seen = next(iter(self._good.items()))
            if now - seen < KNOWN_GOOD_S:
                break
            del self._good[key]

    def _cap(self) -> None:
        for table in (self._pairs, self._sources, self._good):
            while len(table) > self.limits.table_max:
                table.popitem(last=False)
