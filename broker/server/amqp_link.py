"""The merge server's link to a RabbitMQ cluster over AMQP 0-9-1 (pika), beside MqttLink.

RabbitMQ 3.10 has no MQTT shared subscriptions, so several merge servers cannot split
`{prefix}/+/up` between them over MQTT. Over AMQP they can: the MQTT plugin routes every
device publish through `amq.topic` (topic `a/b/c` -> routing key `a.b.c`), and

    {prefix}.*.up      -> queue `{prefix}.up`: one durable quorum queue (replicated on
                          the nodes) that every server consumes as a competing consumer;
    {prefix}.*.status  -> queue `{prefix}.status.{server_id}`: each server's own quorum
                          queue of every device's presence (all servers need all of it);
    server -> amq.topic, routing key `{prefix}.{dev}.down`, persistent -> the device's
                          MQTT session queue, delivered to it with QoS 1.

It offers what the daemon uses of MqttLink (`start`, `stop`, `connected`, `publish`,
`subscribe`) plus `settle(items)`, which the daemon calls with each group of inbox items
once it is processed: **an up message is acknowledged to RabbitMQ only then**, after the
store transaction that applied it committed (and its answers were handed to the
link). A server that dies before that leaves its unacknowledged messages to RabbitMQ,
which hands them to another server; the store applies each change id once, so the
redelivery is answered as a duplicate (same `q`). A message that kept killing servers
is parked by the queue's delivery limit (broker.rabbitmq.definitions).

Ordering: the queue is FIFO, but with several consumers (and redeliveries) one device's
messages can be applied out of order by different servers. PROTOCOL.md §1 requires
servers to tolerate any reordering (merge by stamps, per-change-id idempotency, base
versions), so this costs nothing in correctness; per-scope sequences stay gapless
because they are allocated inside each store transaction.

With `server_states` (a server group) the status queue is also bound to that group's
announcements (`{prefix}._server.{group}.*.state`, PROTOCOL.md §7.12), handed to
`on_server_state`: a server answers another's last will with its own announcement
(broker/server/announcer.py). They come over AMQP, not over the announcer's MQTT link:
an MQTT subscription of a clean session is a transient queue on one node, and after
that node died RabbitMQ 3.10 refuses to declare it again ("home node ... is down"),
closing the connection, until the node is back.

Presence: statuses are acknowledged as they arrive (presence is soft state, rebuilt from
the store at start and refreshed by every device's periodic status). RabbitMQ keeps
retained messages per node and looks them up by exact topic only, so they cannot
rebuild presence; the status queue outlives a server restart instead (it expires only
after `amqp.status_queue_expires_s` unused), so a restarted server reads what it missed.
`on_connect` therefore always reports a kept session.

Threads: pika's BlockingConnection is not thread-safe, so one thread owns it; other
threads reach it only through `add_callback_threadsafe` (publishes and acks, batched).
`publish` never queues without bound: past `max_pending` messages not yet written it
returns False, as MqttLink does when paho's queue is full (devices resend, catch up).
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pika
import structlog

from broker.rabbitmq.definitions import routing_level, status_queue_name, up_queue_name
from broker.server.amqp_failure import quiet_pika
from broker.server.amqp_failure import reason as failure_reason
from waystation.mqtt import Backoff, backoff_delay

__all__ = ["AmqpLink", "routing_key_to_topic", "topic_to_routing_key"]

log = structlog.get_logger(__name__)
quiet_pika()  # every failure is logged once, with its cause, as amqp_connection_failed

OnConnect = Callable[[bool], object]
OnMessage = Callable[[str, bytes], object]
EXCHANGE = "amq.topic"
STATUS_QUEUE_MAX = 100_000
_PERSISTENT = pika.BasicProperties(delivery_mode=2)
_SMALL = 2
"""Payloads shorter than this may be shared (interned) bytes objects in CPython, so they
cannot be told apart by identity: they are acknowledged on arrival (no valid message is
that short; what it is gets dead-lettered by the engine all the same)."""


def topic_to_routing_key(topic: str) -> str:
    """MQTT topic -> AMQP routing key, as RabbitMQ's MQTT plugin maps them."""
    return ".".join(routing_level(level) for level in topic.split("/"))


def routing_key_to_topic(key: str) -> str:
    """AMQP routing key -> MQTT topic (the inverse of `topic_to_routing_key`)."""
    return "/".join(level.replace("/", ".") for level in key.split("."))


class AmqpLink:
    """A self-healing AMQP connection to one of several RabbitMQ nodes (module docstring)."""

    def __init__(self, *, nodes: Sequence[tuple[str, int]], username: str, password: str,
                 prefix: str, server_id: str, prefetch: int = 2000, heartbeat_s: int = 30,
                 status_queue_expires_s: int = 7 * 24 * 3600,
                 on_connect: OnConnect | None = None, on_message: OnMessage | None = None,
                 backoff: Backoff | None = None, max_pending: int = 100_000,
                 server_states: str | None = None,
                 on_server_state: OnMessage | None = None) -> None:
        if not nodes:
            raise ValueError("AmqpLink needs at least one node")
        self.nodes = list(nodes)
        self.credentials = pika.PlainCredentials(username, password)
        self.prefix = prefix
        self.up_queue = up_queue_name(prefix)
        self.status_queue = status_queue_name(prefix, server_id)
        self.prefetch = prefetch
        self.heartbeat_s = heartbeat_s
        self.status_expires_ms = status_queue_expires_s * 1000
        self.backoff = backoff or Backoff()
        self.max_pending = max_pending
        self._on_connect = on_connect
        self._on_message = on_message
        self.server_states = server_states
        self._on_server_state = on_server_state
        self._server_keys = f"{routing_level(prefix)}._server."
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._channel: Any = None
        self._connected = False
        self._up = threading.Event()
        self._generation = 0
        self._unacked: dict[int, tuple[int, int, bytes]] = {}
        self._to_ack: list[int] = []
        self._out: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wake_pending = False
        self._node_index = 0
        self.last_error: str | None = None
        self.node: str | None = None

    @classmethod
    def from_config(cls, cfg: Any, *, env: Mapping[str, str] | None = None,
                    **kwargs: Any) -> AmqpLink:
        """Build from a ServerConfig: `amqp.*`, login from `mqtt.username` / password."""
        nodes = []
        for item in cfg.amqp.nodes:
            host, _, port = item.rpartition(":")
            nodes.append((host, int(port)))
        password = cfg.mqtt.resolved_password(env or {}) or ""
        return cls(nodes=nodes, username=cfg.mqtt.username or "", password=password,
                   prefix=cfg.mqtt.prefix, server_id=cfg.server_id,
                   prefetch=cfg.amqp.prefetch, heartbeat_s=cfg.amqp.heartbeat_s,
                   status_queue_expires_s=cfg.amqp.status_queue_expires_s, **kwargs)

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        return self._connected

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Nothing to do: the queues and bindings are fixed (module docstring)."""

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AmqpLink.start() called twice")
        self._thread = threading.Thread(target=self._run, name="amqp-link", daemon=True)
        self._thread.start()

    def stop(self, clean: bool = True, timeout: float = 10.0) -> None:
        """Close the connection (unacknowledged messages go back to the queue)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or `timeout` seconds pass (False)."""
        return self._up.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue one message for amq.topic; thread-safe. False: not connected, or too much
        is waiting to be written (the caller keeps it; the protocol resends)."""
        with self._lock:
            conn = self._conn
            if not self._connected or conn is None or len(self._out) >= self.max_pending:
                return False
            self._out.append((topic_to_routing_key(topic), payload))
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._call_in_loop(conn, self._flush)
        return True

    def settle(self, items: Iterable[Any]) -> None:
        """Acknowledge the up messages among `items` (processed intake items, with
        `kind`, `payload` and `origin`: `broker.server.intake.Item`); thread-safe.
        Messages of an earlier connection are skipped: RabbitMQ already took them back."""
        with self._lock:
            conn = self._conn
            gen = self._generation
            tags = []
            for item in items:
                if item.kind != "up":
                    continue
                origin = getattr(item, "origin", 0)
                entry = self._unacked.pop(origin or id(item.payload), None)
                # A refusal note carries a cut copy of its payload: matched by origin.
                if entry is not None and entry[0] == gen and (origin or entry[2] is item.payload):
                    tags.append(entry[1])
            if not tags or conn is None:
                return
            self._to_ack.extend(tags)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._call_in_loop(conn, self._flush)

    # ------------------------------------------------------------------ link thread

    def _call_in_loop(self, conn: Any, fn: Callable[[], None]) -> None:
        try:
            conn.add_callback_threadsafe(fn)
        except Exception:  # the connection closed meanwhile: the next one starts afresh
            with self._lock:
                self._wake_pending = False

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            host, port = self.nodes[self._node_index % len(self.nodes)]
            try:
                self._session(host, port)
                attempt = 0
            except Exception as exc:
                reason = failure_reason(exc)
                if reason != self.last_error:
                    log.warning("amqp_connection_failed", node=f"{host}:{port}", reason=reason)
                self.last_error = reason
            finally:
                self._mark_down()
            if self._stopping.is_set():
                break
            self._node_index += 1  # next time, the next node
            delay = backoff_delay(attempt, self.backoff, self._rng)
            attempt += 1
            self._stopping.wait(delay)

    def _session(self, host: str, port: int) -> None:
        params = pika.ConnectionParameters(
            host=host, port=port, credentials=self.credentials, heartbeat=self.heartbeat_s,
            connection_attempts=1, socket_timeout=10, blocked_connection_timeout=60,
            client_properties={"connection_name": f"waystation {self.status_queue}"})
        conn = pika.BlockingConnection(params)
        try:
            channel = conn.channel()
            channel.basic_qos(prefetch_count=self.prefetch)
            channel.queue_declare(self.up_queue, durable=True,
                                  arguments={"x-queue-type": "quorum"})
            channel.queue_bind(self.up_queue, EXCHANGE,
                               routing_key=f"{routing_level(self.prefix)}.*.up")
            channel.queue_declare(self.status_queue, durable=True, arguments={
                "x-queue-type": "quorum", "x-expires": self.status_expires_ms,
                "x-max-length": STATUS_QUEUE_MAX, "x-overflow": "drop-head"})
            channel.queue_bind(self.status_queue, EXCHANGE,
                               routing_key=f"{routing_level(self.prefix)}.*.status")
            if self.server_states is not None:
                channel.queue_bind(self.status_queue, EXCHANGE, routing_key=(
                    f"{self._server_keys}{routing_level(self.server_states)}.*.state"))
            with self._lock:
                self._generation += 1
                self._unacked.clear()
                self._to_ack.clear()
                self._out.clear()
                self._wake_pending = False
                self._conn, self._channel = conn, channel
                self._connected = True
                self._up.set()
            channel.basic_consume(self.status_queue, self._on_status, auto_ack=True)
            channel.basic_consume(self.up_queue, self._on_up, auto_ack=False)
            self.node = f"{host}:{port}"
            self.last_error = None
            log.info("amqp_connected", node=self.node, up=self.up_queue,
                     status=self.status_queue)
            if self._on_connect is not None:
                self._safe(self._on_connect, True)
            while not self._stopping.is_set():
                conn.process_data_events(time_limit=0.5)
            self._flush()
        finally:
            if conn.is_open:
                try:
                    conn.close()
                except Exception:
                    log.debug("amqp_close_failed", exc_info=True)

    def _mark_down(self) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
            self._up.clear()
            self._conn = self._channel = None
            self._unacked.clear()
            self._to_ack.clear()
            self._out.clear()
            self._wake_pending = False
        if was:
            log.info("amqp_disconnected", node=self.node, reason=self.last_error)

    def _safe(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("amqp_callback_raised")

    def _deliver(self, method: Any, body: bytes, track: bool) -> None:
        topic = routing_key_to_topic(method.routing_key)
        if track:
            if len(body) < _SMALL:
                self._channel.basic_ack(method.delivery_tag)
            else:
                with self._lock:
                    self._unacked[id(body)] = (self._generation, method.delivery_tag, body)
        if self._on_message is not None:
            self._safe(self._on_message, topic, body)

    def _on_up(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._deliver(method, body, track=True)

    def _on_status(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if method.routing_key.startswith(self._server_keys):
            # a server's announcement (`server_states`; or a binding an earlier run left)
            if self._on_server_state is not None:
                self._safe(self._on_server_state, routing_key_to_topic(method.routing_key),
                           body)
            return
        self._deliver(method, body, track=False)

    def _flush(self) -> None:
        """On the link thread: write queued publishes and acknowledgements."""
        with self._lock:
            out, self._out = self._out, collections.deque()
            acks, self._to_ack = self._to_ack, []
            self._wake_pending = False
            channel = self._channel
        if channel is None:
            return
        for key, payload in out:
            channel.basic_publish(EXCHANGE, key, payload, properties=_PERSISTENT)
        for tag in acks:
            channel.basic_ack(tag)
