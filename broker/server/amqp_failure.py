"""Why an AMQP connection failed, in one line for the log and `last_error`.

pika wraps the cause of a failed connection attempt in layers: a refused or unreachable
node arrives as `AMQPConnectionError(AMQPConnectorSocketConnectError(OSError(...)))`,
whose own text is empty, so the server logged only `reason=AMQPConnectionError` while
pika logged the cause in seven error lines of its own, one with a traceback, at every
attempt (every few seconds while a node is unreachable). `reason(exc)` names the outer
error and the innermost cause:

    AMQPConnectionError: No route to host (OSError errno 113)
    AMQPHeartbeatTimeout: No activity or too many missed heartbeats in the last 2 seconds

and `quiet_pika()` leaves the reporting to the link (`amqp_connection_failed`), which
logs each new reason once.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_pika", "reason"]


def reason(exc: BaseException) -> str:
    """`exc` and, when it wraps another error, the innermost one (module docstring)."""
    head = type(exc).__name__
    inner = _innermost(exc)
    if inner is not exc:
        return f"{head}: {_describe(inner)}"
    text = str(exc)
    return f"{head}: {text}" if text else head


def _innermost(exc: BaseException) -> BaseException:
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nested = getattr(exc, "exception", None)  # pika's AMQPConnectorPhaseErrorBase
        if not isinstance(nested, BaseException):
            nested = next((a for a in exc.args if isinstance(a, BaseException)), None)
        if nested is None:
            nested = exc.__cause__
        if nested is None:
            return exc
        exc = nested
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({type(exc).__name__} errno {exc.errno})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def quiet_pika() -> None:
    """pika's own log only for what the link cannot report (critical)."""
    logging.getLogger("pika").setLevel(logging.CRITICAL)
