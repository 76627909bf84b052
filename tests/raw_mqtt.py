"""Raw MQTT 3.1.1 bytes and socket checks for tests that speak to a broker below any
client library (hostile and malformed packets)."""

from __future__ import annotations

import socket
import ssl
import struct


def mqtt_string(text: str | bytes) -> bytes:
    """A length-prefixed MQTT string (UTF-8 for `str`, as given for `bytes`)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the broker has closed `sock` (EOF or reset); what it sent is discarded.
    Without select(), which cannot watch a descriptor numbered 1024 or more (a flooder
    holding thousands of sockets uses this too); `sock`'s timeout is left as it was."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            try:
                if not sock.recv(65536):
                    return True
            except (BlockingIOError, ssl.SSLWantReadError):
                return False  # nothing more to read, and open
            except OSError:
                return True
    finally:
        sock.settimeout(timeout)


__all__ = ["closed_by_peer", "mqtt_string", "remaining_length"]
