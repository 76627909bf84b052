"""Which of several logins the next broker connection attempt uses (pure): the broker
passwords of `agent.creds` and the client certificates of `agent.clientcert`.

The owner lists its candidates newest first at each attempt; the choice starts at the
first, moves on to the next when the broker refuses the one tried (wrapping round, so
a login refused once by a broker not yet switched is tried again later), and goes back
to the first once one is accepted or the owner's candidates change. Not thread-safe:
the owner calls it under its own lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

H = TypeVar("H")
"""What the owner holds for a candidate (None: the configured login)."""
V = TypeVar("V")
"""What the link is given for it (a password, a certificate's files)."""


class LoginChoice(Generic[H, V]):
    """The position in the owner's candidates and the one being tried."""

    def __init__(self) -> None:
        self._index = 0
        self.trying: H | None = None
        """The candidate the last `pick` gave (None: the configured one, or none)."""

    def pick(self, candidates: Sequence[tuple[H | None, V]]) -> V | None:
        """The login for the next attempt (None when there is none)."""
        if not candidates:
            self.trying = None
            return None
        held, value = candidates[self._index % len(candidates)]
        self.trying = held
        return value

    def refused(self) -> H | None:
        """The broker refused the login just tried: the next one next time. Returns it."""
        self._index += 1
        return self.trying

    def accepted(self) -> H | None:
        """The broker accepted the login just tried: the first again. Returns it."""
        self._index = 0
        return self.trying

    def restart(self) -> None:
        """The candidates changed (a newer login arrived): start from the first."""
        self._index = 0


__all__ = ["LoginChoice"]
