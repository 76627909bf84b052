"""Turns of the connections of one client id between their CONNECT's session-table step
and their attach (fix 7 of `broker.embedded.amqtt_broker`).

A connection of a client id that is connected takes the session over: it stops the
connection it finds in amqtt's session table, awaits that, then attaches itself and
takes the table's entry. Two such connections at once (a broker frozen and resumed
finds a device's old connection, the attempts the device gave up on and its live one,
all at once) both found and stopped the same old connection; the first to attach was
then stopped by no one, and its end, not seen as a take-over, published the device's
will over its fresh status and marked the shared session disconnected under the live
connection, which heard nothing more (every message for the device queued for a session
believed away). Taking turns, each connection takes over the one attached before it.

    turns = AttachTurns()
    release = await turns.wait(client_id)   # from the session-table step ...
    release()                               # ... to the attach (idempotent)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class AttachTurns:
    """One asyncio lock per client id with connections in the section; forgotten when
    the last leaves it (the table follows the connects in progress, not the fleet)."""

    def __init__(self) -> None:
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._turns)

    async def wait(self, client_id: str) -> Callable[[], None]:
        """Wait for `client_id`'s turn; returns what ends it (callable more than once)."""
        lock, users = self._turns.get(client_id) or (asyncio.Lock(), 0)
        self._turns[client_id] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave(client_id)
            raise
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                lock.release()
                self._leave(client_id)

        return release

    def _leave(self, client_id: str) -> None:
        lock, users = self._turns[client_id]
        if users <= 1:
            del self._turns[client_id]
        else:
            self._turns[client_id] = (lock, users - 1)


__all__ = ["AttachTurns"]
