"""Logging for every Waystation process: structlog key-value events on one stream.

Call `configure_logging(cfg.log)` once, from an entry point (a `run` command), never
from library code. Afterwards `structlog.get_logger(__name__).info("event", key=value)`
writes one line per event: human-readable text (``format = "console"``) or one JSON
object per line (``format = "json"``, for journald and log shippers), each with an ISO
timestamp (UTC), the level and the logger name. Standard-library logging (paho-mqtt,
amqtt, asyncio, ...) goes through the same renderer, at WARNING and above, so one stream
carries everything.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from waystation.config import LogConfig

# Loggers of our own packages log at the configured level; everything else at WARNING.
OWN_LOGGERS = ("waystation", "agent", "broker", "schemas")
# Chatty third-party loggers, held at WARNING even when our level is debug.
QUIET_LOGGERS = ("paho", "amqtt", "transitions", "asyncio", "psycopg", "hbmqtt")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


class _WaystationHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler we install on the root logger (found again on reconfiguration)."""


def _leading_keys(_logger: Any, _name: str, event: Any) -> Any:
    """Put timestamp, level, logger and event first in each JSON line."""
    head = {k: event.pop(k) for k in ("timestamp", "level", "logger", "event") if k in event}
    head.update(event)
    return head


def configure_logging(cfg: LogConfig, *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (default: stderr) per `cfg`.

    Calling it again replaces the previous configuration (no duplicate handlers).
    """
    out = stream if stream is not None else sys.stderr
    level = _LEVELS[cfg.level]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any
    if cfg.format == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
        final: list[Any] = [tracebacks, _leading_keys, renderer]
    else:
        colors = bool(getattr(out, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback)
        final = [renderer]

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.PositionalArgumentsFormatter(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # amqtt names the client of a protocol line only in its LoggerAdapter's extra.
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(allow=("client_id",))],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = _WaystationHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _WaystationHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


__all__ = ["OWN_LOGGERS", "QUIET_LOGGERS", "configure_logging"]
