"""How far a device's clock is from the server's, from its live `status` (PROTOCOL.md
§7.10), and how that reads to an operator (pure but for the log).

Why it matters: every change carries its hybrid-logical-clock stamp (`waystation.hlc`),
whose wall time is the device's clock. A clock far AHEAD is caught per change (its
stamps re-stamped or refused, `clock_skew`, `broker.server.applier`); a clock far
BEHIND (an RTC reset to 1970 or 2000, NTP dead) is accepted, and its changes lose
last-writer-wins to writes that are older in reality. Nobody would know: this module
is how the operator learns it.

The measure: a status's `t` (the device's time) minus when the server received it
(`received`, taken on the network thread before the intake queue). Transit only makes
that smaller, never larger, so:

- a status more than `merge.max_skew_ms` AHEAD proves the device's clock ahead at once;
- a status BEHIND may be a status that waited on the way: a retained one replayed on
  subscribe (the caller passes only live ones: MQTT's retain flag), or one a broker
  queued in the server's persistent session while it was down, or a backlog of the
  AMQP status queue, all delivered with no retain flag. One behind is believed only
  together with the device's previous live status: both behind, received at least
  `MIN_GAP_MS` apart, and the device's clock advanced as much as the server's between
  them (within `slack`). A backlog arrives in a burst (its statuses, 30 s apart on the
  device, arrive milliseconds apart), and a backlog status followed by a live one
  disagrees by the time the backlog waited; so only statuses that waited about equally,
  i.e. a device clock that really is that far behind, pass. The Waystation agent
  publishes a status every 30 s: a device behind is named about 30 s after it connects.
- a status within `merge.max_skew_ms` either way says the clock is fine (offset 0),
  but for a clock judged ahead: a status that waited as long as the clock is ahead
  looks right, so it is right again only when two statuses that agree say so.

The offset kept is clamped to `CAP_MS` (100 years) either way: a hostile `t` (up to
2^53 ms, the year 287,396) cannot make anything overflow, and a text beyond a year says
"over a year" with the year the device's clock reads (1970 for an RTC that lost power),
never "20,000 days".
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from waystation.timefmt import about, year

log = structlog.get_logger(__name__)

MIN_GAP_MS = 10_000
"""Two live statuses confirm a clock behind only when received this far apart at least."""
SLACK_MS = 2_000
"""How much two confirming statuses may disagree on the offset, at least."""
YEAR_MS = 365 * 86_400_000
CAP_MS = 100 * YEAR_MS
"""The largest offset kept, either way."""
EFFECT_BEHIND = ("its changes are accepted with old times: they lose last-writer-wins to "
                 "other devices' writes that are older in reality")
EFFECT_AHEAD = ("its changes are re-stamped with the server's time or refused (clock_skew, "
                "merge.skew_policy)")
FIX = "fix the device's time sync (NTP)"
LOG_EVERY_MS = 600_000
"""At most one clock log event per device per this many ms (`ClockLog`)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One live status: the device's time `t` and the server's when it arrived (ms)."""

    t: int
    at: int

    @property
    def offset(self) -> int:
        return self.t - self.at


def slack(gap_ms: int) -> int:
    """How much two statuses `gap_ms` apart may disagree and still confirm each other."""
    return max(SLACK_MS, gap_ms // 10)


def clamp(offset: int) -> int:
    return max(-CAP_MS, min(CAP_MS, offset))


def agree(prev: Sample | None, cur: Sample) -> bool:
    """Two live statuses that travelled alike: received `MIN_GAP_MS` or more apart, and
    the device's clock advanced as much as the server's between them (within `slack`)."""
    if prev is None:
        return False
    gap = cur.at - prev.at
    return gap >= MIN_GAP_MS and abs(cur.offset - prev.offset) <= slack(gap)


def judge(prev: Sample | None, cur: Sample, max_skew_ms: int, was: int = 0) -> int | None:
    """The device's clock offset (ms, + ahead, - behind; 0 within `max_skew_ms`) that
    the live status `cur` proves, `prev` being the device's previous live status and
    `was` the offset last judged; None: it proves nothing yet (see module docstring)."""
    off = cur.offset
    if off > max_skew_ms:
        return clamp(off)
    if off >= -max_skew_ms:
        # A clock judged ahead looks right in a status that waited as long as it is
        # ahead: it is right again only when two statuses that agree say so.
        if was > 0 and not (agree(prev, cur) and prev is not None
                            and prev.offset <= max_skew_ms):
            return None
        return 0
    if prev is None or prev.offset >= -max_skew_ms or not agree(prev, cur):
        return None
    # Whatever both waited on the way counts against the device: the less behind of two.
    return clamp(max(off, prev.offset))


def describe(offset: int, measured_ms: int) -> str:
    """ "clock 3 h behind", "clock 12 days ahead", "clock over a year behind (it reads
    1970)"; "" for 0 (in sync). `measured_ms` is when the server measured it."""
    if not offset:
        return ""
    way = "ahead" if offset > 0 else "behind"
    size = abs(offset)
    if size < YEAR_MS:
        # Rounded: a clock ahead is measured less the status's transit, so a clock set
        # exactly 3 h ahead (a time zone taken for UTC) would read "2 h" truncated.
        return f"clock {about(size)} {way}"
    text = f"clock over a year {way}"
    reads = year(measured_ms + offset) if size < CAP_MS else 0
    if 0 < reads < 10_000:
        text += f" (it reads {reads})"
    return text


class ClockWatch:
    """The server's memory of each device's clock: its last live status, the offset last
    judged (seeded from the store's row), and the log (see `ClockLog`). One thread."""

    def __init__(self, max_skew_ms: int, log_every_ms: int = LOG_EVERY_MS) -> None:
        self.max_skew_ms = max_skew_ms
        self._last: dict[str, Sample] = {}
        self._anchor: dict[str, Sample] = {}
        self._offset: dict[str, int] = {}
        self.log = ClockLog(log_every_ms)

    def observe(self, dev: str, cur: Sample, stored: int) -> int | None:
        """A live status of `dev`; `stored` is the offset its row holds (the last judged,
        also by an earlier server run). Returns the offset to store, None: nothing new."""
        was = self._offset.get(dev, stored)
        # Paired with the latest status when it is `MIN_GAP_MS` older, else with the
        # anchor: a status kept until one comes that much after it. With the latest
        # alone, a device reporting more often than that (a short
        # sync.status_interval_s, prompt reports of a busy outbox) never had a pair:
        # a clock behind was never named, and one judged ahead stayed "ahead" after it
        # went behind.
        last, anchor = self._last.get(dev), self._anchor.get(dev)
        prev = (last if last is not None and cur.at - last.at >= MIN_GAP_MS
                else anchor if anchor is not None and cur.at - anchor.at >= MIN_GAP_MS
                else last)
        offset = judge(prev, cur, self.max_skew_ms, was)
        self._last[dev] = cur
        if anchor is None or not 0 <= cur.at - anchor.at < MIN_GAP_MS:
            self._anchor[dev] = cur
        if offset is None:
            return None
        self._offset[dev] = offset
        if bool(was) != bool(offset):
            self.log.changed(dev, offset, cur.at)
        return offset

    def off(self) -> int:
        """How many devices' clocks are off, as last judged in this run (for metrics;
        safe to call from another thread: it copies first)."""
        for _ in range(3):
            try:
                return sum(1 for offset in list(self._offset.values()) if offset)
            except RuntimeError:  # resized by the engine's thread meanwhile
                continue
        return 0

    def forget(self, keep: set[str]) -> None:
        """Drop what is held of devices not in `keep` (removed ones)."""
        for held in (self._last, self._anchor, self._offset):
            for dev in [d for d in held if d not in keep]:
                del held[dev]


class ClockLog:
    """`device_clock_off` when a device's clock is first seen off, `device_clock_ok` when
    it is right again: on the change, not per status. A device flipping between the two
    as fast as it can publish gets one event per `every_ms` (the tick, `flush`, logs the
    latest state held meanwhile, with `unlogged`, the changes not logged one by one)."""

    def __init__(self, every_ms: int = LOG_EVERY_MS) -> None:
        self.every_ms = every_ms
        self._logged: dict[str, int] = {}
        self._held: dict[str, tuple[int, int, int]] = {}
        """Device -> (its latest offset, when, changes held since its last event)."""

    def changed(self, dev: str, offset: int, now: int) -> None:
        last = self._logged.get(dev)
        if last is not None and now - last < self.every_ms:
            held = self._held.get(dev, (offset, now, 0))[2]
            self._held[dev] = (offset, now, held + 1)
            return
        # A change held from before is superseded by this one, logged now (flushed after
        # it, the older state would be the log's last word about the device).
        superseded = self._held.pop(dev, None)
        self._emit(dev, offset, now, now, None if superseded is None else superseded[2])

    def flush(self, now: int) -> None:
        for dev, (offset, at, held) in list(self._held.items()):
            if now - self._logged.get(dev, 0) >= self.every_ms:
                del self._held[dev]
                self._emit(dev, offset, at, now, held)
        for dev, at in list(self._logged.items()):
            if now - at >= self.every_ms and dev not in self._held:
                del self._logged[dev]

    def _emit(self, dev: str, offset: int, at: int, now: int, unlogged: int | None) -> None:
        self._logged[dev] = now
        extra = {} if unlogged is None else {"unlogged": unlogged}
        if offset:
            log.warning("device_clock_off", dev=dev, offset_ms=offset,
                        clock=describe(offset, at), effect=EFFECT_AHEAD if offset > 0
                        else EFFECT_BEHIND, fix=FIX, **extra)
        else:
            log.info("device_clock_ok", dev=dev, **extra)


__all__ = ["CAP_MS", "EFFECT_AHEAD", "EFFECT_BEHIND", "FIX", "LOG_EVERY_MS", "MIN_GAP_MS",
           "ClockLog", "ClockWatch", "Sample", "agree", "clamp", "describe", "judge",
           "slack"]
