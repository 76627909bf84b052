"""The daemon's wake socket (a mixin of `agent.daemon.AgentDaemon`): writers in any
process poke it after a commit (`Agent._poke`), so the daemon sends at once instead of at
its next poll; "sync now" comes the same way."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from typing import Any

import structlog

from agent.api import WAKE_SOCKET, WAKE_SYNC_NOW, Agent

log = structlog.get_logger("waystation.agent")


class WakeHooks:
    """Provides `_open_wake_socket` and `_close_wake_socket` to `AgentDaemon`."""

    agent: Agent
    dev: str
    _wake_sock: socket.socket | None
    _stopping: threading.Event
    _events: queue.SimpleQueue[tuple[Any, ...]]

    def _open_wake_socket(self) -> None:
        # Writers in any process poke this socket after a commit (Agent._poke), so the
        # daemon sends at once instead of at its next poll.
        path = self.agent.store.path / WAKE_SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(path))
        except OSError as exc:
            # Path too long for AF_UNIX or not writable: fall back to polling.
            log.info("wake_socket_unavailable", path=str(path), error=str(exc))
            sock.close()
            return
        self._wake_sock = sock
        threading.Thread(target=self._wake_reader, args=(sock,), name=f"wake-{self.dev}",
                         daemon=True).start()

    def _wake_reader(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                data = sock.recv(64)
            except OSError:
                return
            self._events.put(("sync_now",) if data == WAKE_SYNC_NOW else ("wake",))

    def _close_wake_socket(self) -> None:
        sock, self._wake_sock = self._wake_sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with contextlib.suppress(OSError):
                (self.agent.store.path / WAKE_SOCKET).unlink()


__all__ = ["WakeHooks"]
