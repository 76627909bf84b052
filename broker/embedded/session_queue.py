"""What the embedded broker holds for a client (fix 8 of `broker.embedded.amqtt_broker`).

amqtt holds messages without any limit in three places, so one client could grow the
broker until it died (measured: 50,000 1 kB publishes from one device while the merge
server was connected but not reading left the broker at 186 MB, every one PUBACKed):

- **Away**: every QoS 1 message for a persistent session whose client is disconnected
  (a device flooding its `up` topic while the merge server is down).
- **Delivering**: every message on its way to a connected client that does not read
  (one task each, waiting for the socket).
- **Arriving**: every message a client sends, read, PUBACKed and queued for routing
  faster than the broker routes it.

Away and delivering are bounded per client by `max_queued_messages` and `max_queued_mb`;
beyond them a message is dropped for that client (the publisher still gets its PUBACK,
as with Mosquitto's `max_queued_messages`) and the drop is logged, once a minute per
client. Arriving is held back instead: while a client has `INGRESS_MAX` messages
waiting to be routed, or all clients together `ROUTING_MAX`, the broker reads nothing
more from it and TCP slows it down; nothing is dropped. Nothing is lost by the drops
either: a device's change stays in its outbox until the server acks it and is sent
again, and a device that missed deltas catches up from its checkpoint (PROTOCOL.md §9).

When an away client is back its queue is delivered with at most `REPLAY_WINDOW`
messages awaiting their PUBACK at a time (amqtt started one task per queued message at
once) and without the retain flag (amqtt set it on every one; MQTT 3.1.1 §3.3.1.3
reserves it for retained messages sent on a new subscription).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("broker.embedded.amqtt_broker")

REPLAY_WINDOW = 100
INGRESS_MAX = 1000
"""Messages of one client read but not routed yet, beyond which it is not read."""
ROUTING_MAX = 10_000
"""Messages of all clients waiting for the router, beyond which no client is read."""
_QUEUED_BYTES = "waystation.queued_bytes"
_DELIVERING = "waystation.delivering"
_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class QueueLimits:
    """Per persistent session, while its client is away."""

    messages: int = 20_000
    bytes: int = 64 << 20


class SessionQueues:
    """Admits messages to away sessions' queues within `limits`; says what it dropped,
    once a minute per client at most."""

    def __init__(self, limits: QueueLimits, clock: Any = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._dropped: dict[str, int] = {}  # client id -> dropped since last said
        self._said: dict[str, float] = {}

    def admit(self, session: Any, size: int) -> bool:
        """True when a message of `size` bytes fits in `session`'s queue (counted)."""
        queued = int(session.attributes.get(_QUEUED_BYTES, 0))
        if (session.retained_messages.qsize() >= self.limits.messages
                or queued + size > self.limits.bytes):
            self._drop(str(session.client_id), session.retained_messages.qsize(), queued)
            return False
        session.attributes[_QUEUED_BYTES] = queued + size
        return True

    def start_delivery(self, session: Any, size: int) -> bool:
        """True when one more message of `size` bytes may be on its way to `session`'s
        connected client (counted until `end_delivery`)."""
        count, queued = session.attributes.get(_DELIVERING, (0, 0))
        if count >= self.limits.messages or queued + size > self.limits.bytes:
            self._drop(str(session.client_id), count, queued)
            return False
        session.attributes[_DELIVERING] = (count + 1, queued + size)
        return True

    @staticmethod
    def end_delivery(session: Any, size: int) -> None:
        count, queued = session.attributes.get(_DELIVERING, (1, size))
        session.attributes[_DELIVERING] = (max(0, count - 1), max(0, queued - size))

    @staticmethod
    def ingress_room(session: Any, routing: asyncio.Queue[Any]) -> Callable[[], bool]:
        """Whether the broker may read the next packet of `session`'s client: its own
        messages waiting to be routed, and everyone's, are under their bounds."""
        arrived = session.delivered_message_queue

        def room() -> bool:
            return arrived.qsize() < INGRESS_MAX and routing.qsize() < ROUTING_MAX

        return room

    def _drop(self, client_id: str, count: int, queued: int) -> None:
        dropped = self._dropped.get(client_id, 0) + 1
        now = self._clock()
        if now - self._said.get(client_id, -_LOG_EVERY_S) < _LOG_EVERY_S:
            self._dropped[client_id] = dropped
            return
        self._said[client_id] = now
        self._dropped.pop(client_id, None)
        if len(self._said) > 10_000:  # clients come and go: keep the table bounded
            self._said = {client_id: now}
        log.warning("client queue full: messages for it dropped",
                    client_id=client_id[:200], dropped=dropped, queued=count,
                    queued_bytes=queued, max_messages=self.limits.messages,
                    max_bytes=self.limits.bytes,
                    hint="nothing is lost (devices resend and catch up); a client that is "
                         "away or not reading: bring it back, or raise max_queued_messages "
                         "/ max_queued_mb")

    async def replay(self, session: Any, handler: Any) -> None:
        """Deliver `session`'s queue to its new connection, `REPLAY_WINDOW` at a time."""
        queue = session.retained_messages
        session.attributes[_QUEUED_BYTES] = 0
        pending: set[asyncio.Future[Any]] = set()
        while not queue.empty():
            msg = queue.get_nowait()
            pending.add(asyncio.ensure_future(
                handler.mqtt_publish(msg.topic, msg.data, msg.qos, retain=False)))
            if len(pending) >= REPLAY_WINDOW:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                _settle(done)
        if pending:
            done, _ = await asyncio.wait(pending)
            _settle(done)


def _settle(done: set[asyncio.Future[Any]]) -> None:
    """Retrieve the outcomes: a connection lost mid-replay ends it quietly (what was not
    delivered is resent or caught up by the protocol)."""
    for task in done:
        if not task.cancelled():
            task.exception()


__all__ = ["INGRESS_MAX", "REPLAY_WINDOW", "ROUTING_MAX", "QueueLimits", "SessionQueues"]
