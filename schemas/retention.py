"""Per-collection retention: which synced records a device may evict, and when.

Declared in the collection schema, so every device of the fleet follows the same rule
(the operator decides once what a device may forget, not each device's config):

    [collections.tasks.retention]
    after = "7d"                            # this long after the record last synced
    when = { status = ["delivered", "failed"] }   # optional: only records like these

`after` is a duration: an integer number of seconds or a string like ``"90s"``,
``"30m"``, ``"12h"``, ``"7d"``. `when` maps a field to the values that make a record
evictable; every listed field must hold one of its values (a deleted record is always
evictable once `after` has passed: there is nothing left to show). Without `when`,
every record of the collection is evictable after `after`.

Pure: `evictable` decides from plain values, so the agent's eviction pass and its tests
share one rule. Retention is local to each device (the server keeps everything it is
told to keep by its own `[retention]` config): changing it is a compatible schema change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.wire_types import FIELD_PATTERN

MAX_AFTER_S = 100 * 365 * 86_400
"""A century: longer than any device lives, small enough for ms arithmetic."""
MAX_WHEN_VALUES = 64
_DURATION_RE = re.compile(r"^\s*(\d{1,12})\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
_FIELD_RE = re.compile(FIELD_PATTERN)

WhenValue = str | int | bool


def parse_duration_s(raw: Any) -> int:
    """Seconds from an int or a string like "7d"; ValueError saying what is expected."""
    if isinstance(raw, bool):
        raise ValueError("a duration must be seconds (an integer) or a string like '7d'")
    if isinstance(raw, int):
        seconds = raw
    elif isinstance(raw, str):
        match = _DURATION_RE.fullmatch(raw)
        if match is None:
            raise ValueError(f"duration {raw!r} is not like '90s', '30m', '12h' or '7d'")
        seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        raise ValueError("a duration must be seconds (an integer) or a string like '7d'")
    if seconds < 0 or seconds > MAX_AFTER_S:
        raise ValueError(f"duration must be between 0 and {MAX_AFTER_S} seconds (100 years)")
    return seconds


class RetentionRule(BaseModel):
    """When a device may evict a synced record of one collection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    after: Annotated[int, Field(ge=0, le=MAX_AFTER_S)]
    """Seconds after the record last synced (the server last told the device of it)."""
    when: dict[str, tuple[WhenValue, ...]] = Field(default_factory=dict)

    @field_validator("after", mode="before")
    @classmethod
    def _duration(cls, raw: Any) -> int:
        return parse_duration_s(raw)

    @field_validator("when", mode="before")
    @classmethod
    def _when(cls, raw: Any) -> dict[str, tuple[WhenValue, ...]]:
        if not isinstance(raw, Mapping):
            raise ValueError("'when' must be a table of field = [values]")
        out: dict[str, tuple[WhenValue, ...]] = {}
        for name, values in raw.items():
            if not isinstance(name, str) or not _FIELD_RE.fullmatch(name):
                raise ValueError(f"'when' names {name!r}, not a field name")
            if not isinstance(values, list | tuple) or not values:
                raise ValueError(f"when.{name} must be a non-empty list of values")
            if len(values) > MAX_WHEN_VALUES:
                raise ValueError(f"when.{name} lists more than {MAX_WHEN_VALUES} values")
            for value in values:
                if not isinstance(value, str | int | bool) or isinstance(value, float):
                    raise ValueError(f"when.{name} may list strings, integers and bools only")
            out[name] = tuple(values)
        return out

    @property
    def after_ms(self) -> int:
        return self.after * 1000

    def matches(self, fields: Mapping[str, Any], deleted: bool) -> bool:
        """Whether a record with these values is of the kind this rule evicts."""
        if deleted:
            return True
        for name, allowed in self.when.items():
            value = fields.get(name)
            # bool is an int in Python: compare types too, so True never matches 1.
            if not any(type(value) is type(a) and value == a for a in allowed):
                return False
        return True


def evictable(rule: RetentionRule, fields: Mapping[str, Any], deleted: bool, synced_ms: int,
              now_ms: int, *, pending: bool, conflicted: bool, pressure: bool = False) -> bool:
    """Whether a device may evict this record now.

    Never a record with pending writes (they would lose their base) or an open conflict
    (a person must see it). `pressure` (the disk quota is reached): the age condition is
    lifted, the kind condition (`when`) still holds -- quota never evicts what the
    operator did not declare evictable.
    """
    if pending or conflicted:
        return False
    if not rule.matches(fields, deleted):
        return False
    return pressure or now_ms - synced_ms >= rule.after_ms


__all__ = ["MAX_AFTER_S", "RetentionRule", "evictable", "parse_duration_s"]
