"""Pieces of the TCP relays the fault tests put between two parts (tests/silent_link.py,
tests/deaf_relay.py, tests/slow_relay.py): accepting a client with its own connection to
the target, copying bytes one way until either side ends, and `Relay`, a listener on
127.0.0.1 that hands each connection pair to its subclass."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Self


def relay_pairs(listener: socket.socket,
                target: tuple[str, int]) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Each accepted client with a fresh connection to `target`, until the listener is
    closed (a client whose target connection fails is closed and skipped)."""
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        yield client, upstream


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy `src` to `dst` until either ends, then shut both down."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        close_both(src, dst)


def close_both(a: socket.socket, b: socket.socket) -> None:
    for sock in (a, b):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


__all__ = ["close_both", "pump", "relay_pairs"]


class Relay:
    """Listens on 127.0.0.1:`port` (chosen by the kernel); each client gets its own
    connection to `target`, numbered from 1 (`connections`), and the pair goes to
    `relay(client, upstream, number)`. Closing shuts every socket it made."""

    def __init__(self, target: tuple[str, int], name: str) -> None:
        self.target = target
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=name).start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            socks, self._sockets = [self._listener, *self._sockets], []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def relay(self, client: socket.socket, upstream: socket.socket, number: int) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        for client, upstream in relay_pairs(self._listener, self.target):
            with self._lock:
                self.connections += 1
                number = self.connections
                self._sockets += [client, upstream]
            self.relay(client, upstream, number)
