"""Log events of the query package, safe for library use.

The agent's query code runs inside apps and CLI commands as well as the daemon. Only an
entry point configures logging (`waystation.logs.configure_logging`); until one has,
structlog would print to stdout — into an app's or a `--json` command's output. So an
event goes to structlog only once it is configured, and otherwise warnings go to the
standard library's logger (stderr by default) and the rest is dropped.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

_log = structlog.get_logger("agent.query")
_std = logging.getLogger("agent.query")


def event(level: str, name: str, **fields: Any) -> None:
    if structlog.is_configured():
        getattr(_log, level)(name, **fields)
    elif level in ("warning", "error"):
        _std.log(logging.getLevelName(level.upper()), "%s %s", name, fields)


__all__ = ["event"]
