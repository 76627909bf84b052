"""Reconnect delays: exponential growth with full jitter above a floor.

Used by the MQTT link (`waystation.mqtt`) and the server's AMQP link; pure (the random
source is passed in), so tests can seed it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Reconnect delays: see ``backoff_delay``."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1:
            raise ValueError(f"invalid backoff {self}")


def backoff_delay(attempt: int, policy: Backoff, rng: random.Random | None = None) -> float:
    """The wait before reconnect attempt ``attempt`` (0 for the first retry).

    Full jitter above a floor: uniform in ``[initial, min(maximum, initial * multiplier
    ** (attempt + 1))]``. The floor keeps a client from hammering a broker that refuses
    it instantly; the jitter over the whole range spreads a fleet that lost its broker
    at the same instant, so the broker is not hit by every device at once when it returns.
    """
    ceiling = policy.maximum
    exponent = attempt + 1
    # avoid float overflow for large attempt counts
    if exponent < 64:
        ceiling = min(policy.maximum, policy.initial * policy.multiplier**exponent)
    return (rng or random).uniform(policy.initial, ceiling)


def backoff_delays(policy: Backoff, rng: random.Random | None = None) -> Iterator[float]:
    """The endless series of delays ``backoff_delay(0), backoff_delay(1), ...``."""
    attempt = 0
    while True:
        yield backoff_delay(attempt, policy, rng)
        attempt += 1


__all__ = ["Backoff", "backoff_delay", "backoff_delays"]
