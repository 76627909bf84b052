"""A slowloris client for the HTTP endpoints' tests: a request head sent one byte at a
time, each byte well within any per-read timeout, never completed."""

from __future__ import annotations

import socket
import time


def send_head_slowly(sock: socket.socket, head: bytes, *, give_up_s: float = 10.0) -> bool:
    """Send `head` a byte at a time (0.2 s apart at most) until the server closes the
    connection (True) or `head` or `give_up_s` runs out (False)."""
    sock.settimeout(0.2)
    started = time.monotonic()
    for byte in head:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            return True
        if time.monotonic() - started > give_up_s:
            break
    return False
