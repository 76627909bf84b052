"""amqtt internals Waystation overrides: a subclass of amqtt 0.12.1's ``Broker`` with the
fixes listed in `broker.embedded.amqtt_broker`'s docstring (TCP_NODELAY, authentication
before the session table, retained messages checked against the ACL, required client
certificates, the packet size limit, the keepalive enforced, session take-over, bounded
queues for clients that are away, a deadline for CONNECT, bounded QoS 2 flows, one
line, not a traceback, for messages a client does not acknowledge, connections per
source and failed logins bounded through `broker.embedded.conn_guard`, the
subscription table iterated over a copy, packets MQTT 3.1.1 forbids refused, the TLS
handshake inside the CONNECT deadline, each retained message replayed as it is when
sent, and unacknowledged messages of a persistent session resent).

The overridden methods are amqtt internals, so they are pinned to one release:
`broker.embedded.amqtt_broker` refuses to start on another amqtt version, or when one of
the `OVERRIDDEN` names is gone.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import weakref
from collections import deque
from collections.abc import ItemsView, Iterator, KeysView
from typing import Any

import structlog
from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.utils import gen_client_id

from broker.embedded.amqtt_handler import KeepaliveHandler, keepalive_timeout
from broker.embedded.attach_turns import AttachTurns
from broker.embedded.client_limits import (
    CONNECT_TIMEOUT_S,
    PacketDeadlineReader,
    drop_connection,
    stalled,
)
from broker.embedded.conn_guard import ConnGuard
from broker.embedded.conn_table import ConnLimits
from broker.embedded.login_guard import LoginLimits
from broker.embedded.packet_limit import DEFAULT_MAX_PACKET, LimitedReader
from broker.embedded.protocol_reader import CheckedReader, ProtocolViolation
from broker.embedded.session_queue import QueueLimits, SessionQueues
from broker.embedded.tls_accept import handshake

log = structlog.get_logger("broker.embedded.amqtt_broker")

AMQTT_VERSION = "0.12.1"
"""The amqtt release whose internals ``WaystationBroker`` overrides were written for."""

_PREAUTH = "waystation.preauthenticated"
_COMPACT_MIN = 1024


class SubscriptionTable(dict[str, Any]):
    """amqtt's table of subscriptions (topic filter -> [(session, qos)]), iterated over a
    copy (fix 12). amqtt walks it with awaits inside the loop (each message's delivery in
    `_run_broadcast`, a reconnect's retained messages), while other connections
    subscribe, or leave and have their filters deleted: a publish that coincided with
    any client's disconnect died with "dictionary changed size during iteration",
    undelivered, and logged a traceback (seen at every stop of a broker with a device
    and a server on it)."""

    # (dict's own views of self, copied at once: dict.copy and dict(self) would call
    # these methods back on a subclass)
    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.keys(self)))

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        return dict(dict.items(self)).keys()

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        return dict(dict.items(self)).items()


class WaystationBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with the fixes listed in the module docstring."""

    def __init__(self, config: dict[str, Any], *, require_client_cert: bool,
                 max_packet: int = DEFAULT_MAX_PACKET,
                 queue_limits: QueueLimits | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S,
                 conn_limits: ConnLimits | None = None,
                 login_limits: LoginLimits | None = None) -> None:
        super().__init__(config)
        self._subscriptions = SubscriptionTable(self._subscriptions)  # type: ignore[has-type]
        self._connect_timeout = connect_timeout
        # Fix 11: connections per source and in all, failed logins (conn_guard).
        self._guard = ConnGuard(conn_limits or ConnLimits(), login_limits or LoginLimits())
        self._require_client_cert = require_client_cert
        self._max_packet = max_packet
        self._queues = SessionQueues(queue_limits or QueueLimits())
        self._compact_at = _COMPACT_MIN
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        # Handlers of connections whose session a new connection of the same client
        # took over (fix 7): their end must leave the session alone.
        self._taken_over: weakref.WeakSet[Any] = weakref.WeakSet()
        self._turns = AttachTurns()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        ticket = self._guard.admit(writer)  # fix 11: over a bound it is closed already
        if ticket is None:
            return
        try:
            await self._stream_connected(reader, writer, listener_name, ticket)
        finally:
            self._guard.close(ticket)

    async def _stream_connected(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter, listener_name: str,
                                ticket: Any) -> None:
        sock = writer.get_extra_info("socket")
        nodelay = False
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            except OSError as exc:
                log.warning("could not set TCP_NODELAY", error=str(exc))
        peer = writer.get_extra_info("peername")
        log.debug("client socket accepted", listener=listener_name, peer=peer,
                  tcp_nodelay=nodelay)
        loop = asyncio.get_running_loop()
        connect_by = loop.time() + self._connect_timeout
        context = self._tls_contexts.get(listener_name)
        # Fix 14: the handshake is ours, inside the CONNECT deadline, and said when it
        # fails (broker.embedded.tls_accept). Nothing may await before it starts.
        if context is not None and not await handshake(reader, writer, context,
                                                       self._connect_timeout, peer):
            return
        checked = CheckedReader(reader, self._max_packet, peer)
        checked.connect_by = connect_by
        checked.ticket = ticket
        await self._client_connected(listener_name, checked, StreamWriterAdapter(writer))

    async def _create_server_instance(self, listener_name: str, listener_type: Any,
                                      address: str | None, port: int,
                                      ssl_context: ssl.SSLContext | None) -> Any:
        # A TLS listener accepts plain TCP; stream_connected runs the handshake (fix 14).
        if ssl_context is not None and str(getattr(listener_type, "value", listener_type)) \
                == "tcp":
            self._tls_contexts[listener_name] = ssl_context
            ssl_context = None
        return await super()._create_server_instance(listener_name, listener_type, address,
                                                     port, ssl_context)

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        context: ssl.SSLContext = super()._create_ssl_context(listener)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self._require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        if session.attributes.pop(_PREAUTH, False):
            return True
        return bool(await super()._authenticate(session, listener))

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        # amqtt 0.12.1's method, with authentication moved before any use of the session
        # table (see fix 2 in the module docstring). Errors raised here make amqtt log the
        # attempt and drop the connection.
        # amqtt waited for the CONNECT for ever and left the socket open when it failed to
        # come (fix 9): every connection that does not log in is closed now.
        connect_by = getattr(reader, "connect_by", None)
        timeout = (self._connect_timeout if connect_by is None
                   else max(0.0, connect_by - asyncio.get_running_loop().time()))
        try:
            handler, client_session = await asyncio.wait_for(
                KeepaliveHandler.init_from_connect(reader, writer, self.plugins_manager),
                timeout)
        except TimeoutError as exc:
            drop_connection(writer)
            raise AMQTTError(f"no CONNECT from {remote_address}:{remote_port} within "
                             f"{self._connect_timeout:g} s: connection closed") from exc
        except ProtocolViolation as exc:
            if exc.refusal.connack is not None:  # fix 13: say why before closing
                await ConnackPacket.build(0, exc.refusal.connack).to_stream(writer)
            await writer.close()
            raise AMQTTError(exc) from exc
        except (AMQTTError, NoDataError) as exc:
            await writer.close()
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc

        # Fix 11: a source guessing passwords is refused before any is checked.
        ticket = getattr(reader, "ticket", None)
        user = client_session.username
        refused = self._guard.login_refusal(remote_address, user)
        accepted = refused is None and await super()._authenticate(client_session, None)
        if refused is None:
            self._guard.login_done(ticket, remote_address, user, bool(accepted))
        if not accepted:
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(
                f"connection from {remote_address}:{remote_port} refused "
                f"(client id {client_session.client_id!r}, user {client_session.username!r})"
            )

        # Fix 7: the connections of one client id take turns from here to their attach
        # (broker.embedded.attach_turns; the turn ends in KeepaliveHandler.attach).
        if client_session.client_id:
            handler.attach_turn = await self._turns.wait(client_session.client_id)
        try:
            client_session = await self._adopt_session(client_session)
        except BaseException:
            handler.end_turn()
            raise

        client_session.keep_alive = keepalive_timeout(client_session.keep_alive)
        client_session.attributes[_PREAUTH] = True
        handler.queues = self._queues
        handler.current = self._get_handler
        if isinstance(reader, LimitedReader):
            reader.room = self._queues.ingress_room(client_session, self._broadcast_queue)
        if isinstance(reader, CheckedReader):
            reader.client_id = client_session.client_id
        if isinstance(reader, PacketDeadlineReader):  # fix 9: the keepalive inside a packet
            reader.deadline_s = client_session.keep_alive
            reader.on_stall = stalled(client_session.client_id, client_session.keep_alive,
                                      writer)
        return handler, client_session

    async def _adopt_session(self, client_session: Any) -> Any:
        """The session table's part of a CONNECT (amqtt 0.12.1's, with fix 7): the
        session the new connection gets, its old connection ended or marked taken over."""
        if client_session.clean_session:
            if client_session.client_id:
                # amqtt deletes the session but leaves its connection open: two live
                # connections of one client, and the old one's will, published when it
                # ends, overwrites what the new one said. End it as a take-over (fix 7).
                old = self._sessions.get(client_session.client_id)
                if old is not None and old[1] is not None and old[0].transitions.is_connected():
                    self._taken_over.add(old[1])
                    await old[1].handle_connection_closed()
                    await old[1].stop()
                    # What the old connection was PUBACKed for and not routed yet goes
                    # before the session and its queues are deleted (it went with them).
                    await self._route_left(old[0], old[1],
                                           _take_all(old[0].delivered_message_queue))
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            existing, old_handler = self._sessions[client_session.client_id]
            if old_handler is not None and existing.transitions.is_connected():
                # amqtt's take-over stops the old connection; its end is ours
                # (_handle_disconnect). Taking turns, it is the one stopped.
                self._taken_over.add(old_handler)
            existing.will_flag = client_session.will_flag
            existing.will_message = client_session.will_message
            existing.will_topic = client_session.will_topic
            existing.will_qos = client_session.will_qos
            existing.will_retain = client_session.will_retain
            existing.keep_alive = client_session.keep_alive
            existing.username = client_session.username
            existing.password = client_session.password
            existing.is_anonymous = client_session.is_anonymous
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0
        return client_session

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        # amqtt forgets finished deliveries only from the head of this deque: behind one
        # that never ends (a client that does not read) every later one stayed, a leak
        # as long as the flood. Finished ones are dropped wherever they are.
        if len(running_tasks) >= self._compact_at:
            pending = [t for t in running_tasks if not t.done()]
            for task in running_tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.warning("delivery failed", error=repr(task.exception())[:300])
            running_tasks.clear()
            running_tasks.extend(pending)
            self._compact_at = max(_COMPACT_MIN, 2 * len(pending))
        await super()._run_broadcast(running_tasks)

    async def _client_message_loop(self, client_session: Any, handler: Any) -> None:
        await super()._client_message_loop(client_session, handler)
        # What the client sent and was PUBACKed before it left is routed now: amqtt left
        # it queued until the client's next connection (a persistent session), or for
        # ever (a clean one), e.g. a device's last status before a clean DISCONNECT.
        # Most of it was taken out of the session as it was marked disconnected
        # (_handle_disconnect); the rest is in the session's queue unless a new
        # connection took the session over (that one routes it).
        left: list[Any] = handler.left_behind
        handler.left_behind = []
        current = self._sessions.get(client_session.client_id)
        if current is None or current[1] is handler or current[0] is not client_session:
            left.extend(_take_all(client_session.delivered_message_queue))
        await self._route_left(client_session, handler, left)

    async def _route_left(self, session: Any, handler: Any, messages: list[Any]) -> None:
        """Route `messages`, what `session`'s client sent before its connection ended."""
        loop = asyncio.get_running_loop()
        for message in messages:
            done = loop.create_future()
            done.set_result(message)
            if not await self._handle_message_delivery(session, handler, done):
                break

    async def _handle_disconnect(self, client_session: Any, handler: Any,
                                 disconnect_waiter: Any) -> None:
        # amqtt 0.12.1's method, except where a new connection took the session over: the
        # session lives on with it, so it is not marked disconnected (amqtt would queue
        # the device's messages as for an offline session while it sat connected) and no
        # will goes out (the new CONNECT replaced it; the device is online). The take-over
        # is looked for again after the handler stopped: a CONNECT arriving meanwhile (a
        # clean DISCONNECT and a new login at once) took it over too.
        stopped = False
        if handler not in self._taken_over:
            result = disconnect_waiter.result()
            if not isinstance(result, DisconnectPacket) and client_session.will_flag:
                await self._broadcast_message(client_session, client_session.will_topic,
                                              client_session.will_message,
                                              client_session.will_qos)
                if client_session.will_retain:
                    await self.retain_message(client_session, client_session.will_topic,
                                              client_session.will_message,
                                              client_session.will_qos)
            await self._stop_handler(handler)
            stopped = True
            if handler not in self._taken_over:
                # Taken out of the session before it reads as disconnected, with no await
                # in between: amqtt's session monitor empties a disconnected clean
                # session's queues (every second), and it emptied this one while the
                # messages were routed one by one after the disconnect (the tail of a
                # flood, PUBACKed, lost whenever the routing spanned a wake-up: on a
                # loaded machine). _client_message_loop routes them.
                handler.left_behind = _take_all(client_session.delivered_message_queue)
                client_session.transitions.disconnect()
                await self.plugins_manager.fire_event(
                    BrokerEvents.CLIENT_DISCONNECTED, client_id=client_session.client_id,
                    client_session=client_session)
                return
        self._taken_over.discard(handler)
        log.info("client session taken over by a new connection: old connection closed",
                 client_id=client_session.client_id)
        if not stopped:
            await self._stop_handler(handler)

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int,
                                        target_session: Any) -> None:
        if self._queues.admit(target_session, len(broadcast.get("data") or b"")):
            await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_session_retained_messages(self, session: Any) -> None:
        handler = self._get_handler(session)
        if handler is not None:
            await self._queues.replay(session, handler)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        subscribers = self._subscriptions.get(topic_filter, [])
        if handler is None or all(s.client_id != session.client_id for s, _ in subscribers):
            return
        tasks = []
        for topic in list(self._retained_messages):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, AmqttAction.RECEIVE):
                continue
            # Fix 15: the topic's retained message as it is now, not as it was when the
            # replay started. The ACL check above awaits, and a message published on the
            # topic meanwhile went to this (already subscribed) client live: the older
            # one sent after it would read as the topic's latest (a device's last will
            # replayed after its fresh "online": the merge server believed it offline).
            # What is published from here on is sent after this (tasks start in order).
            retained = self._retained_messages.get(topic)
            if retained is None:
                continue  # cleared meanwhile
            tasks.append(asyncio.ensure_future(handler.mqtt_publish(
                retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
            )))
        if tasks:
            await asyncio.wait(tasks)


def _take_all(queue: asyncio.Queue[Any]) -> list[Any]:
    """Everything in `queue`, in order, taken out of it."""
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


OVERRIDDEN = (
    "stream_connected",
    "_client_connected",
    "_create_ssl_context",
    "_create_server_instance",
    "_authenticate",
    "_initialize_client_session",
    "_publish_retained_messages_for_subscription",
    "_delete_session",
    "_topic_filtering",
    "_get_handler",
    "_matches",
    "_handle_disconnect",
    "_stop_handler",
    "_retain_broadcast_message",
    "_publish_session_retained_messages",
    "_client_message_loop",
    "_handle_message_delivery",
    "_run_broadcast",
    "_handle_client_session",
)


__all__ = ["AMQTT_VERSION", "OVERRIDDEN", "WaystationBroker"]
