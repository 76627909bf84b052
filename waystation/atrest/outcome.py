"""What an encryption-at-rest command did (printed as text, or `to_dict()` with --json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """The result of `encrypt`, `decrypt` or `rekey` on one store."""

    command: str
    store: str
    before: str
    """plain | legacy | envelope: how the store was encrypted before"""
    after: str
    changed: bool
    resumed: bool
    """it finished a run that had been interrupted"""
    values: int
    """values rewritten by this run (0 for a rekey: it rewrites no value)"""
    data_key: str | None
    """the data key file, when the store has one"""
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["Outcome"]
