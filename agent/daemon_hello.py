"""The daemon's hellos, and what they tell it about how to send transactions (a mixin of
`agent.daemon.AgentDaemon`; PROTOCOL.md §7.1, §7.2.1, §7.11)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.sync import Sync
from schemas import wire
from waystation.config import AgentConfig


class HelloHooks:
    """Provides `_say_hello`, `_hello_if_moved` and `_txn_on` to `AgentDaemon`."""

    cfg: AgentConfig
    sync: Sync
    gate: Any
    _answered: bool
    _hello_at: float
    _hellos_unwelcomed: int
    _hello_cp: Any
    _hello_msg: Callable[[], wire.Hello]
    _send: Callable[[wire.Message], bool]

    def _say_hello(self, *, again: bool = False) -> None:
        """Send a hello and forget what the previous one agreed: the capabilities are
        agreed anew on every connection and whenever a merge server (re)starts, since a
        server killed before its `welcome` went out leaves none behind (§7.11)."""
        self.sync.server_caps = None
        self.sync.upgrade_needed = False
        self._hello_at = time.monotonic()
        if not again:  # evidence that the server answers holds for the connection
            self._answered = False
        self._hellos_unwelcomed = self._hellos_unwelcomed + 1 if again else 1
        hello = self._hello_msg()
        if self._send(hello):
            self._hello_cp = hello.cp

    def _hello_if_moved(self) -> None:
        """Tell the server how far this device has caught up (hello carries its
        checkpoints), when that moved since the last hello (operator's view, §7.1)."""
        hello = self._hello_msg()
        if hello.cp != self._hello_cp and self._send(hello):
            self._hello_cp = hello.cp

    def _txn_on(self) -> bool | None:
        """How to send transactions (PROTOCOL.md §7.2.1): marked as units (True) only to
        a server whose welcome to the latest hello agreed to `txn`; as plain changes
        (False) to one whose welcome did not, or that sent no welcome within the ack
        timeout (a server from before capabilities); None -- hold them back, and what
        comes after them -- until one of the two is known.

        "Did not" needs evidence, never silence alone: a server down or restarting
        (announced down, or answering nothing since the hello) is waited for, because
        sending a transaction as plain changes to a server that does apply them whole
        would let it apply part of one."""
        caps = self.sync.server_caps
        if caps is not None:
            return "txn" in caps
        if self.gate.server.up is False or not self._answered:
            return None
        if time.monotonic() - self._hello_at < self.cfg.sync.ack_timeout_s:
            return None
        if self._hellos_unwelcomed < 2:  # that hello may have died with a server: again
            self._say_hello(again=True)
            return None
        return False


__all__ = ["HelloHooks"]
