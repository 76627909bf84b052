"""The root of every error Waystation raises on purpose.

    WaystationError                 raised deliberately; the message says what to do
    ├── ConfigError                 a config file or env override is wrong (names file, key)
    ├── ListenError                 a configured port cannot be listened on (in use)
    ├── ClockSkewError              a clock stamp is further ahead than the configured bound
    ├── schemas.ProtocolError       bytes on the wire are not a valid message (carries a code)
    ├── schemas.CollectionSchemaError  an operator's collection schema file is wrong
    ├── agent.AgentError            device-side failures (storage full, write refused, ...)
    └── broker.ServerError          server / embedded broker failures

Each package defines its own subtree in its `errors.py`; all derive from this class, so
the CLI can print any of them as one line and exit non-zero without a traceback.
"""

from __future__ import annotations


class WaystationError(Exception):
    """Base class: `str(err)` is a complete sentence an operator can act on."""

    exit_code: int = 1


class ConfigError(WaystationError):
    """A configuration file, environment override or CLI option is invalid."""

    exit_code = 2


class ClockSkewError(WaystationError):
    """A hybrid-logical-clock stamp lies further in the future than the allowed skew."""


class ListenError(WaystationError):
    """A port the config names cannot be listened on (in use, not permitted); the
    message names the address, the config key and what to do."""

    exit_code = 4
