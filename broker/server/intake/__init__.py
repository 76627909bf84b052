"""The server's intake: what arrived from devices, bounded in bytes and served fairly.

    fair     FairQueue: per-device queues, deficit round robin by bytes, the bounds (pure)
    bounded  Intake: the same behind a lock, `put` blocking while full (backpressure)
"""

from __future__ import annotations

from broker.server.intake.bounded import Intake, IntakeStats
from broker.server.intake.fair import (
    ITEM_OVERHEAD,
    REFUSED_HEAD,
    FairQueue,
    IntakeLimits,
    Item,
    Verdict,
)

__all__ = [
    "ITEM_OVERHEAD",
    "REFUSED_HEAD",
    "FairQueue",
    "Intake",
    "IntakeLimits",
    "IntakeStats",
    "Item",
    "Verdict",
]
