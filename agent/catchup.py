"""Following one catch-up to its end (PROTOCOL.md §7.8, §9.5). Pure: no I/O.

The server answers each `catchup` on its own: an answer in which some scope says `more`
has no `checkpoint`, and the continuation the device sends for that scope is answered
with a checkpoint naming that scope alone. A scope that was complete in such an answer
(its last page, or no page at all) therefore appears in no checkpoint of the chain - and
only a checkpoint ends a snapshot (§9.5) and tells the device that a scope is caught up.

`CatchupRound` follows one catch-up of the daemon: the scopes it asked for, those a
checkpoint has confirmed, those whose last page said `more`. Once every continuation is
answered and scopes are still unconfirmed, `after_checkpoint` names them: the daemon
asks for them again (at their checkpoints; an answer with no page when nothing is new).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class CatchupRound:
    """One catch-up: request id, the scopes asked for, and how far the answers got."""

    req: str
    scopes: frozenset[str]
    confirmed: set[str] = field(default_factory=set)
    """Scopes a `checkpoint` of this round listed (or denied)."""
    continuing: set[str] = field(default_factory=set)
    """Scopes whose latest page said `more`: a continuation is on its way."""

    @property
    def done(self) -> bool:
        """Every scope asked for is confirmed by a checkpoint."""
        return self.scopes <= self.confirmed

    def on_page(self, scope: str, more: bool) -> None:
        """A page of this round arrived (the daemon continues `scope` when `more`)."""
        if more:
            self.continuing.add(scope)
        else:
            self.continuing.discard(scope)

    def after_checkpoint(self, listed: Iterable[str], denied: Iterable[str] = ()
                         ) -> frozenset[str]:
        """A checkpoint of this round arrived; the scopes to ask for again now (empty
        while continuations are still out, or when the round is done)."""
        got = set(listed) | set(denied)
        self.confirmed |= got
        self.continuing -= got
        if self.continuing:
            return frozenset()
        return self.scopes - self.confirmed


__all__ = ["CatchupRound"]
