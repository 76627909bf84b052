"""A TCP relay to an MQTT broker that makes chosen connections deaf: everything the client
sends reaches the broker, and everything the broker sends reaches the client except its
PUBLISH packets (CONNACK, SUBACK, PUBACK and PINGRESP pass). The client's keepalive is
answered and its publishes are acknowledged, yet it hears no message: what a session a
broker wrongly believes offline, or a subscription lost in a failover, looks like from
the device.

    with DeafRelay(broker_port, deaf_connections={1}) as relay:
        ... connect to relay.port; the first connection is deaf, later ones are not
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Collection

from tests.tcp_relay import Relay, close_both, pump

_PUBLISH = 3


class DeafRelay(Relay):
    """Relays 127.0.0.1:`port` to the broker; connections numbered from 1 in
    `deaf_connections` get no PUBLISH from the broker."""

    def __init__(self, broker_port: int, deaf_connections: Collection[int]) -> None:
        self.deaf = set(deaf_connections)
        self.dropped = 0
        """PUBLISH packets the relay kept from a deaf connection's client."""
        super().__init__(("127.0.0.1", broker_port), "deaf-relay")

    def relay(self, client: socket.socket, upstream: socket.socket, number: int) -> None:
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._down, args=(upstream, client, number),
                         daemon=True).start()

    def deafen_current(self) -> None:
        """From now on the latest connection hears nothing more (later ones do)."""
        with self._lock:
            self.deaf.add(self.connections)

    def _down(self, src: socket.socket, dst: socket.socket, number: int) -> None:
        """Broker to client, packet by packet, leaving PUBLISH out while the connection
        numbered `number` is deaf."""
        buf = b""
        try:
            while data := src.recv(65536):
                buf += data
                while (packet := _next_packet(buf)) is not None:
                    size = len(packet)
                    if packet[0] >> 4 == _PUBLISH and number in self.deaf:
                        with self._lock:
                            self.dropped += 1
                    else:
                        dst.sendall(packet)
                    buf = buf[size:]
        except OSError:
            pass
        finally:
            close_both(src, dst)


def _next_packet(buf: bytes) -> bytes | None:
    """The first whole MQTT packet in `buf` (fixed header, remaining length), or None."""
    length, shift = 0, 0
    for i in range(1, min(len(buf), 5)):
        length |= (buf[i] & 0x7F) << shift
        if not buf[i] & 0x80:
            end = i + 1 + length
            return buf[:end] if len(buf) >= end else None
        shift += 7
    return None


__all__ = ["DeafRelay"]
