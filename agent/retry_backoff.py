"""How long the daemon waits before sending again a change the server refused for now
(a transient reject: device disabled, server busy, ...). Pure logic: the daemon draws
the random number, counts the tries, and keeps the time (`agent.daemon_receive`).

Full jitter above a floor, like the reconnect backoff (`waystation.backoff`): the floor
keeps a device from resending at once into the same refusal, the jitter over the whole
range keeps a fleet refused at the same moment (a server restart) from coming back at
the same moment.
"""

from __future__ import annotations

_MAX_EXPONENT = 1023
"""2.0 ** 1023 is the largest power of two a float holds: past it the ceiling is the
maximum anyway, and an exponent from an unbounded try count must not overflow."""


def retry_delay(tries: int, initial: float, maximum: float, draw: float) -> float:
    """Seconds before the next try of a change refused for now `tries` times (1 after the
    first refusal): `draw` (uniform in [0, 1)) places it between `initial` and
    min(`maximum`, `initial` * 2 ** `tries`). The same as ``random.uniform`` over that
    range with ``draw = random.random()``."""
    ceiling = min(maximum, initial * 2.0 ** min(tries, _MAX_EXPONENT))
    high = max(ceiling, initial)  # never below the floor, whatever the settings
    return initial + (high - initial) * draw


__all__ = ["retry_delay"]
