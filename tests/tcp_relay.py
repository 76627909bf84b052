"""Pieces of the TCP relays the fault tests put between two parts (tests/silent_link.py,
tests/deaf_relay.py): accepting a client with its own connection to the target, and
copying bytes one way until either side ends."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


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
