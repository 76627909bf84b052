"""Bounds on the log lines a client can make the embedded broker write.

amqtt 0.12.1 logs a line for every packet a client gets wrong, and some of Waystation's
own events are per packet too, so one hostile or broken device could grow the broker's
log without end and fill the disk, or hit journald's rate limit, which then drops every
other line of the broker (measured over TCP, 10,000 packets each, ``--log-level info``):

- QoS 1 messages to a device that never PUBACKs: a warning and a 10-line traceback
  per message (111,179 lines, 10.5 MB);
- PUBACKs for packet ids the broker never sent: 10,001 lines, 1.2 MB;
- publishes the ACL refuses: 10,001 lines, 1.5 MB.

`RepeatFilter`, a ``logging.Filter`` on the broker's loggers (`install`), lets through
the first line of one kind (its text with names and numbers taken out) from one client
and holds back the others for `INTERVAL_S`, counting them; at the end of the interval
one line says how many there were: the last of them with
``(412 more like it in the last 60 s)`` (``more_like_it=412 in_last_s=60`` on our own
structured events). All clients together get `KIND_MAX` lines of one kind per interval,
and the rest is counted the same way, so a fleet misbehaving at once is bounded too;
all kinds together get `TOTAL_MAX` lines. Lines that name no client (amqtt's connection
errors) have only those overall bounds.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

INTERVAL_S = 60.0
"""The window in which one kind of line from one client is logged once."""
KIND_MAX = 20
"""Lines of one kind (all clients together) logged per window."""
TOTAL_MAX = 200
"""Lines of all kinds together logged per window (kinds hidden in text could be many)."""
MAX_KEYS = 10_000
"""Windows tracked at once; beyond that those that ended are forgotten."""
FIELD_MAX = 300
"""Characters of one field (a client id, a user, a topic) kept in a line; the rest is cut
(a client id may be 65,535 bytes: amqtt and the auth plugin logged it whole, twice per
refused CONNECT, 131 KB of log for a 64 KB packet)."""
LINE_MAX = 2_000
"""Characters of a plain-text (amqtt) line kept."""

LOGGERS = ("amqtt.broker", "amqtt.mqtt.protocol.handler", "amqtt.session",
           "amqtt.adapters", "amqtt.plugins.manager",
           "broker.embedded.amqtt_broker", "broker.embedded.plugins",
           "broker.embedded.packet_limit")
"""The loggers a client's packets make write (amqtt's at WARNING and above)."""

REPLACED = ("Timeout waiting for PUBACK", "Timeout waiting for PUBREC",
            "Timeout waiting for PUBCOMP")
"""amqtt lines dropped outright: the broker logs its own event for them, naming the client
and what to do (`broker.embedded.amqtt_overrides`)."""

_SUMMARY = "waystation_repeat_summary"
_ALL = "*"
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|<[^>]*>|0x[0-9a-fA-F]+|\d+")


@dataclass
class _Window:
    start: float
    passed: int = 0
    held: int = 0
    last: logging.LogRecord | None = None
    clients: set[str] = field(default_factory=set)
    total: bool = False
    """The window of all kinds together: its summary names no kind."""


def kind_of(record: logging.LogRecord) -> tuple[str, str | None]:
    """(kind, client) of a record: the kind is the logger and the text with quoted
    names, reprs and numbers taken out; the client is the client id or user it names."""
    msg = record.msg
    if isinstance(msg, dict):  # one of our structlog events
        client = msg.get("client_id") or msg.get("user")
        return f"{record.name}:{msg.get('event')}", None if client is None else str(client)
    client = getattr(record, "client_id", None)
    text = _VARYING.sub("#", record.getMessage())[:120]
    return f"{record.name}:{text}", None if client is None else str(client)


def _client_caused(record: logging.LogRecord) -> bool:
    """Lines a client can repeat: amqtt's (WARNING and above reach us), and our own that
    name a client or are warnings."""
    if record.name.startswith("amqtt") or record.levelno >= logging.WARNING:
        return True
    msg = record.msg
    return isinstance(msg, dict) and ("client_id" in msg or "user" in msg)


class RepeatFilter(logging.Filter):
    """Holds back repeats of one kind of line per client and per kind (module docstring)."""

    def __init__(self, interval_s: float = INTERVAL_S, kind_max: int = KIND_MAX,
                 clock: Callable[[], float] = time.monotonic,
                 total_max: int = TOTAL_MAX) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.kind_max = kind_max
        self.total_max = total_max
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        # Runs inside amqtt's protocol code: it must never raise there (a line with bad
        # format arguments is let through for the handler to report).
        try:
            admitted = self._admit(record)
            if admitted:
                shorten(record)
            return admitted
        except Exception:
            return True

    def _admit(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        if record.name.startswith("amqtt") and str(record.msg).startswith(REPLACED):
            return False
        if not _client_caused(record):
            return True
        kind, client = kind_of(record)
        now = self._clock()
        own = None if client is None else self._window(kind, client, now)
        if own is not None and own.passed:
            return self._hold(own, record, client)
        overall = self._window(kind, _ALL, now)
        if overall.passed >= self.kind_max:
            return self._hold(overall, record, client)
        total = self._window(_ALL, _ALL, now)
        if total.passed >= self.total_max:
            return self._hold(total, record, client)
        total.passed += 1
        overall.passed += 1
        if own is not None:
            own.passed += 1
        return True

    def _window(self, kind: str, client: str, now: float) -> _Window:
        key = (kind, client)
        window = self._windows.get(key)
        if window is not None and now - window.start < self.interval_s:
            return window
        # A window that ended holding lines back says so, and that line is the new
        # window's one: a client repeating itself without pause costs a line a window.
        said = window is not None and self._say(window)
        if len(self._windows) >= MAX_KEYS:
            self.flush(now)
            if len(self._windows) >= MAX_KEYS:
                self.close()
        window = self._windows[key] = _Window(now, passed=int(said), total=key == (_ALL, _ALL))
        return window

    def _hold(self, window: _Window, record: logging.LogRecord, client: str | None) -> bool:
        window.held += 1
        window.last = record
        if client is not None and len(window.clients) < 1000:
            window.clients.add(client)
        self._schedule(window.start + self.interval_s)
        return False

    def _schedule(self, at: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # said when the next line of its kind comes, or at flush() / close()
        if self._timer is not None and self._timer_loop is loop and not self._timer.cancelled():
            return
        self._timer_loop = loop
        self._timer = loop.call_later(max(0.0, at - self._clock()) + 0.01, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()
        pending = [w.start for w in self._windows.values() if w.held > 0]
        if pending:
            self._schedule(min(pending) + self.interval_s)

    def flush(self, now: float | None = None) -> None:
        """Say what each window that ended held back, and forget the windows that ended."""
        now = self._clock() if now is None else now
        for key, window in list(self._windows.items()):
            if now - window.start < self.interval_s:
                continue
            if self._say(window):
                self._windows[key] = _Window(now, passed=1, total=window.total)
            else:
                del self._windows[key]

    def close(self) -> None:
        """Say everything held back (the broker is stopping) and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        windows, self._windows = list(self._windows.values()), {}
        for window in windows:
            self._say(window)

    def _say(self, window: _Window) -> bool:
        """Log what `window` held back, if anything (True: a line was written)."""
        record, held = window.last, window.held
        window.held, window.last = 0, None
        if record is None or held <= 0:
            return False
        if window.total:
            self._say_total(record, held)
            return True
        summary = logging.makeLogRecord(record.__dict__)
        setattr(summary, _SUMMARY, True)
        summary.exc_info, summary.exc_text, summary.stack_info = None, None, None
        span = f"{self.interval_s:g}"
        if isinstance(record.msg, dict):
            event = dict(record.msg)
            event["more_like_it"] = held
            event["in_last_s"] = float(span)
            if len(window.clients) > 1:
                event["clients"] = len(window.clients)
            if "timestamp" in event:  # when it is said, as the lines around it
                event["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            summary.msg = event
        else:
            whose = f" from {len(window.clients)} clients" if len(window.clients) > 1 else ""
            summary.msg = f"{record.getMessage()} ({held} more like it{whose} in the last {span} s)"
            summary.args = ()
        logging.getLogger(record.name).handle(summary)
        return True


    def _say_total(self, last: logging.LogRecord, held: int) -> None:
        text = str(last.msg.get("event")) if isinstance(last.msg, dict) else last.getMessage()
        summary = logging.LogRecord(
            __name__, logging.WARNING, __file__, 0,
            f"{held} more lines about clients held back in the last {self.interval_s:g} s "
            f"(the broker writes at most {self.total_max} a window; the last: {text[:200]})",
            (), None)
        setattr(summary, _SUMMARY, True)
        logging.getLogger(__name__).handle(summary)


def shorten(record: logging.LogRecord) -> None:
    """Cut `record`'s long fields (`FIELD_MAX`) or long text (`LINE_MAX`) in place."""
    msg = record.msg
    if isinstance(msg, dict):
        for key, value in list(msg.items()):
            if isinstance(value, str) and len(value) > FIELD_MAX:
                msg[key] = f"{value[:FIELD_MAX]}... ({len(value)} characters)"
        return
    text = record.getMessage()
    if len(text) > LINE_MAX:
        record.msg, record.args = f"{text[:LINE_MAX]}... ({len(text)} characters)", ()


def install(names: Iterable[str] = LOGGERS, repeat: RepeatFilter | None = None) -> RepeatFilter:
    """Put one `RepeatFilter` on each logger in `names` (replacing an earlier one)."""
    repeat = repeat or RepeatFilter()
    for name in names:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RepeatFilter)]:
            logger.removeFilter(old)
        logger.addFilter(repeat)
    return repeat


def uninstall(repeat: RepeatFilter, names: Iterable[str] = LOGGERS) -> None:
    """Take `repeat` off the loggers again, saying what it held back."""
    for name in names:
        logging.getLogger(name).removeFilter(repeat)
    repeat.close()


__all__ = ["FIELD_MAX", "INTERVAL_S", "KIND_MAX", "LINE_MAX", "LOGGERS", "REPLACED", "TOTAL_MAX",
           "RepeatFilter", "install", "kind_of", "shorten", "uninstall"]
