"""amqtt's per-connection protocol handler with Waystation's fixes (listed in
`broker.embedded.amqtt_broker`'s docstring): the keepalive enforced, packets read under a
deadline, bounded QoS 2 flows, MQTT 3.1.1's forbidden packets refused, one line instead
of a traceback for messages a client does not acknowledge. `WaystationBroker`
(`broker.embedded.amqtt_overrides`) makes one for each connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from amqtt.mqtt.constants import QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage

from broker.embedded.client_limits import drop_connection, qos2_refusal
from broker.embedded.protocol_checks import (
    subscribe_qos_violation,
    topic_filter_violation,
    topic_name_violation,
)
from broker.embedded.session_queue import SessionQueues

log = structlog.get_logger("broker.embedded.amqtt_broker")

_RECANCEL_S = 0.05
"""How long a stopping handler waits for its reader to end before cancelling it again."""


class KeepaliveHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's per-connection handler, but a read timeout (no packet for the session's
    keepalive, which the broker sets to 1.5 times the client's) ends the connection: the
    reader then sees end of stream and amqtt handles it as any abnormal disconnect,
    publishing the client's will. Messages on their way to the client are bounded (fix
    8, `queues`)."""

    queues: SessionQueues | None = None
    attach_turn: Callable[[], None] | None = None
    """Ends this connection's turn among its client id's (broker.embedded.attach_turns)."""
    current: Callable[[Any], Any] | None = None
    """The broker's handler of a session now (amqtt's _get_handler)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.left_behind: list[Any] = []
        """Messages the client sent (PUBACKed) not routed yet when it left: the broker
        routes them after its message loop (amqtt_overrides)."""
        self._qos2_flows: set[asyncio.Future[Any]] = set()
        self._stopping = False

    def attach(self, session: Any, reader: Any, writer: Any) -> None:
        # amqtt's _handle_client_session takes the session table's entry right after
        # this, with no await between: the next connection of the client id may go on.
        super().attach(session, reader, writer)
        self.end_turn()

    def end_turn(self) -> None:
        if self.attach_turn is not None:
            self.attach_turn()

    async def mqtt_publish(self, topic: str, data: bytes | bytearray, qos: int | None,
                           retain: bool, ack_timeout: int | None = None) -> Any:
        session, queues = self.session, self.queues
        if session is None or queues is None:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        if self._stopping:  # routed to it as it stops (amqtt sent it nowhere)
            if qos in (1, QOS_2):
                self._hand_back(OutgoingApplicationMessage(session.next_packet_id, topic, qos,
                                                           data, retain))
            return None
        size = len(data)
        if not queues.start_delivery(session, size):
            return None  # dropped, and said (amqtt ignores what a delivery returns)
        try:
            return await super().mqtt_publish(topic, data, qos, retain, ack_timeout)
        except TimeoutError:
            # amqtt gives up on a message whose PUBACK (PUBREC, PUBCOMP) does not come
            # within 5 s and raised here, so each one cost a warning and a traceback of
            # 10 lines (1 KB); said once a minute per client now (broker.embedded.log_limits).
            log.warning("client did not acknowledge a message within 5 s: not sent again",
                        client_id=session.client_id, qos=qos, topic=topic[:200],
                        hint="its MQTT client must PUBACK every QoS 1 message (Waystation "
                             "agents do); nothing is lost, a device catches up from its "
                             "checkpoint, but check what connects as this client id")
            return None
        finally:
            queues.end_delivery(session, size)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        try:
            await super()._handle_qos1_message_flow(app_message)
        except asyncio.CancelledError:
            # amqtt's stop cancels the wait for the PUBACK (of a delivery, or of a resend
            # by _retry_deliveries) and forgets the message.
            if self._stopping and isinstance(app_message, OutgoingApplicationMessage) \
                    and app_message.puback_packet is None:
                self._hand_back(app_message)
            raise

    def _hand_back(self, message: OutgoingApplicationMessage) -> None:
        """A QoS 1 message for this connection's persistent session that it will not
        deliver: stopping (its client left, or a new connection takes the session over),
        it was on its way (its PUBACK not come) or routed to it just then. amqtt dropped
        it, so the session's next connection missed it (MQTT 3.1.1 §4.4: resend): a
        device status published as the merge server reconnected never reached it live.
        It goes to the session's connection now if another one runs, else first thing to
        the next (amqtt's _retry_deliveries, before what was queued while away)."""
        session = self.session
        if session is None or session.clean_session or message.packet_id is None:
            return  # a clean session ends with its connection
        successor = self.current(session) if self.current is not None else None
        if isinstance(successor, KeepaliveHandler) and successor is not self \
                and not successor._stopping:
            task = asyncio.ensure_future(successor.mqtt_publish(
                message.topic, message.data, message.qos, message.retain))
            task.add_done_callback(_retrieve)
            return
        session.inflight_out[message.packet_id] = message  # sent again with its id

    def _violates(self, why: str | None) -> bool:
        """Close the connection over a malformed packet (fix 13); True if it was one."""
        if why is None:
            return False
        log.warning("client disconnected: malformed packet",
                    client_id=self.session.client_id if self.session is not None else None,
                    reason=why[:200], hint="the client breaks MQTT 3.1.1 (topic names and "
                    "filters, QoS 0-2): fix or replace its MQTT library")
        drop_connection(self.writer)
        return True

    async def handle_subscribe(self, subscribe: Any) -> None:
        # Fix 13: amqtt granted "QoS 3" and left malformed filters to the ACL.
        for topic_filter, qos in getattr(subscribe.payload, "topics", None) or []:
            if self._violates(subscribe_qos_violation(qos)
                              or topic_filter_violation(topic_filter)):
                return
        await super().handle_subscribe(subscribe)

    async def handle_unsubscribe(self, unsubscribe: Any) -> None:
        for topic_filter in getattr(unsubscribe.payload, "topics", None) or []:
            if self._violates(topic_filter_violation(topic_filter)):
                return
        await super().handle_unsubscribe(unsubscribe)

    async def handle_publish(self, publish_packet: Any) -> None:
        # Fix 13: amqtt kept the connection of a PUBLISH to a wildcard (no PUBACK).
        if self._violates(topic_name_violation(publish_packet.topic_name)):
            return
        # Fix 9: unreleased QoS 2 messages are bounded (broker.embedded.client_limits).
        session, queues = self.session, self.queues
        if publish_packet.qos not in (0, 1, QOS_2):
            # MQTT 3.1.1 §3.3.1.2 (MQTT-3.3.1-4): close. amqtt kept the connection and
            # logged a 1 KB traceback per 8-byte packet.
            log.warning("client disconnected: PUBLISH with QoS 3",
                        client_id=session.client_id if session is not None else None)
            drop_connection(self.writer)
            return
        if publish_packet.qos == QOS_2 and session is not None and queues is not None:
            header = publish_packet.variable_header
            why = qos2_refusal(session, header.packet_id if header else None,
                               len(publish_packet.data or b""), queues.limits.bytes)
            if why is not None:
                log.warning("client disconnected: too many QoS 2 messages not released",
                            client_id=session.client_id, reason=why,
                            hint="the client must send PUBREL for each PUBREC; Waystation "
                                 "clients publish with QoS 1")
                drop_connection(self.writer)
                return
            if header is not None and publish_packet.topic_name is not None \
                    and publish_packet.data is not None:
                self._detach_qos2_flow(session, header.packet_id, publish_packet)
                return
        await super().handle_publish(publish_packet)

    def _detach_qos2_flow(self, session: Any, packet_id: int, publish_packet: Any) -> None:
        # amqtt's reader keeps every packet's task until those before it are done, and a
        # QoS 2 flow is not done before the client's PUBREL: behind one never released,
        # each later packet (a PINGREQ: 2 bytes) stayed, ~640 bytes each, for the whole
        # connection. The flow runs apart instead; it is held in inflight_in at once, so
        # the bound above counts it. amqtt's handle_publish, otherwise unchanged.
        message = IncomingApplicationMessage(packet_id, publish_packet.topic_name, QOS_2,
                                             publish_packet.data, publish_packet.retain_flag)
        message.publish_packet = publish_packet
        session.inflight_in[packet_id] = message
        flow = asyncio.ensure_future(self._handle_message_flow(message))
        self._qos2_flows.add(flow)
        flow.add_done_callback(self._qos2_flow_done)

    def _qos2_flow_done(self, flow: asyncio.Future[Any]) -> None:
        self._qos2_flows.discard(flow)
        if not flow.cancelled() and flow.exception() is not None:
            log.warning("QoS 2 flow failed", error=repr(flow.exception())[:300])

    async def start(self) -> None:
        await super().start()
        waiter = self._disconnect_waiter
        if self._stopping and waiter is not None and not waiter.done():
            waiter.set_result(None)  # stopped while starting (below): the broker ends it

    async def stop(self) -> None:
        self._stopping = True
        for flow in list(self._qos2_flows):
            flow.cancel()
        reader = self._reader_task
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            # amqtt waits for the reader's own "stopped" signal, and start() for its
            # "ready": a reader cancelled before it first ran (a take-over racing the
            # connection it takes over, still starting) gives neither, so both waited for
            # ever and the socket was never closed (a reconnect storm of one device id
            # leaked a file descriptor per race). Wait for the task itself instead.
            # Python 3.11's asyncio.wait_for (around each of amqtt's reads) drops a
            # cancellation that arrives as the read completes, and the reader reads on:
            # with packets still buffered (a take-over of a device that was sending) it
            # went on until the keepalive ran out, the new connection's CONNECT
            # unanswered and the old one open meanwhile. Cancelled until it ends.
            while not reader.done():
                reader.cancel()
                await asyncio.wait({reader}, timeout=_RECANCEL_S)
            self._reader_stopped.set()
            if self._reader_ready is not None:
                self._reader_ready.set()
        await super().stop()

    def handle_read_timeout(self) -> None:
        if getattr(self.reader, "holding", False):
            return  # not the client's silence: the broker holds its packets back
        client_id = self.session.client_id if self.session is not None else None
        log.info("client keepalive expired: disconnecting", client_id=client_id,
                 keepalive_s=self.session.keep_alive if self.session is not None else None)
        stream = getattr(self.writer, "_writer", None)
        transport = getattr(stream, "transport", None)
        if transport is not None:
            transport.abort()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A handed-back delivery's outcome, taken so asyncio does not log it (a client
    gone again is the next connection's business)."""
    if not task.cancelled():
        task.exception()


def keepalive_timeout(keepalive_s: int) -> int:
    """How long the broker waits for a client's next packet: 1.5 times its keepalive,
    rounded up (0: the client asked for none)."""
    return 0 if keepalive_s <= 0 else -(-keepalive_s * 3 // 2)


__all__ = ["KeepaliveHandler", "keepalive_timeout"]
