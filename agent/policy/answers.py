"""How a probe's text answer is read (pure): "metered?" and "battery?".

- metered: ``1``/``yes``/``true``/``metered``/``on`` -> True; ``0``/``no``/``false``/
  ``unmetered``/``off`` -> False; anything else -> None (unknown: treated as unmetered,
  and reported).
- battery: ``PERCENT [STATUS]``, e.g. ``42 discharging`` or ``87 charging`` or ``100``;
  STATUS ``charging``/``full``/``ac`` counts as charging, anything else (or none) as
  on battery; ``none`` (no battery: mains powered) -> None.
"""

from __future__ import annotations

from agent.policy.decide import Battery

_YES = frozenset({"1", "yes", "true", "metered", "on"})
_NO = frozenset({"0", "no", "false", "unmetered", "off"})
_CHARGING = frozenset({"charging", "full", "ac", "not charging"})


def read_metered(text: str) -> bool | None:
    word = text.strip().lower()
    if word in _YES:
        return True
    if word in _NO:
        return False
    return None


class BadAnswer(ValueError):
    """A probe answered something that is not of the documented form."""


def read_battery(text: str) -> Battery | None:
    """Parse ``PERCENT [STATUS]``; None for ``none``; BadAnswer otherwise."""
    words = text.strip().lower()
    if words in ("none", "mains", ""):
        return None
    head, _, status = words.partition(" ")
    try:
        percent = float(head.rstrip("%"))
    except ValueError:
        raise BadAnswer(f"{text[:60]!r} is not 'PERCENT [charging|discharging]'") from None
    if not 0 <= percent <= 100:
        raise BadAnswer(f"battery level {percent} is not between 0 and 100")
    return Battery(percent, status.strip() in _CHARGING)


__all__ = ["BadAnswer", "read_battery", "read_metered"]
