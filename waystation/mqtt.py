"""The one adapter around paho-mqtt, shared by the device agent and the merge server.

    link = MqttLink(client_id="van-12", host="broker", username="van-12", password=...,
                    will=Will("waystation/van-12/status", b'{"type":"status",...}'),
                    on_message=inbox.put)
    link.subscribe("waystation/van-12/down")
    link.start()
    ...
    if not link.publish("waystation/van-12/up", payload):   # not connected: keep it queued
        ...
    link.stop()                                             # clean: the will is not sent

A link owns one network thread. It connects, and whenever the connection fails or is
lost it reconnects after an exponentially growing, jittered delay (``backoff_delay``),
forever, until ``stop()``; the delay starts over after each successful connection. The
session is persistent by default (clean_session=False): the broker keeps the
subscriptions and queues QoS-1 messages while the device is away. Subscriptions are
remembered and sent again after every reconnect, even when the broker says it kept the
session: Mosquitto 2.0 restores a persistent session's plain subscriptions after a
restart but silently drops its shared ones (``$share/...``), so a merge server trusting
"session present" would never hear from a device again. Subscribing again to a filter
the session holds just replaces it (MQTT 3.1.1 §3.8.4); queued messages stay queued.

Callbacks run on the network thread: they must be quick and thread-safe; the usual
handler hands the message to a queue and returns. An exception in a callback is logged
and swallowed (it never kills the network thread).

``publish`` never queues without bound: it returns False when the link is down (or
paho's own queue is full), and the caller keeps the message in its own outbox. Nothing
here promises delivery; Waystation's protocol acknowledgements do (PROTOCOL.md section 1).

Every socket gets TCP_NODELAY: without it a QoS-1 round trip costs ~40-90 ms of Nagle
and delayed-ACK stalls instead of well under a millisecond.

Not provided: manual PUBACK of incoming messages. A message id is only meaningful on
the connection it arrived on (after a reconnect the same id names another message),
amqtt gives up on a delivery whose PUBACK takes more than 5 s, and the protocol's own
acks and catch-up already make a lost delivery harmless, so the complication buys
nothing here.

The network thread itself (connecting, paho's loop, reconnecting, paho's callbacks) is
`waystation.mqtt_thread`, mixed into `MqttLink`.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
from collections.abc import Mapping
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from waystation.backoff import Backoff, backoff_delay, backoff_delays
from waystation.linkproblems import LinkProblem
from waystation.mqtt_hooks import (
    CertProvider,
    OnConnect,
    OnDisconnect,
    OnMessage,
    OnProblem,
    PasswordProvider,
    Will,
    link_options,
)
from waystation.mqtt_thread import NetworkThread
from waystation.mqtt_tls import TlsSettings, ssl_context

__all__ = [
    "Backoff",
    "CertProvider",
    "MqttLink",
    "TlsSettings",
    "Will",
    "backoff_delay",
    "backoff_delays",
]

log = structlog.get_logger(__name__)


class MqttLink(NetworkThread):
    """A self-healing MQTT 3.1.1 connection on its own thread (see the module docstring)."""

    def __init__(
        self,
        *,
        client_id: str,
        host: str,
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        tls: TlsSettings | None = None,
        keepalive: int = 30,
        clean_session: bool = False,
        will: Will | None = None,
        max_inflight: int = 100,
        max_queued: int = 10_000,
        connect_timeout: float = 10.0,
        backoff: Backoff | None = None,
        on_connect: OnConnect | None = None,
        on_disconnect: OnDisconnect | None = None,
        on_message: OnMessage | None = None,
        on_retained: OnMessage | None = None,
        on_problem: OnProblem | None = None,
        rng: random.Random | None = None,
        password_provider: PasswordProvider | None = None,
        cert_provider: CertProvider | None = None,
    ) -> None:
        """Configure the link; nothing happens on the network until ``start()``.

        ``max_inflight``: QoS-1 messages awaiting PUBACK (100 is fast; paho slows down
        at 1000, it rescans the list on every ack). ``max_queued``: paho's own queue
        beyond that, after which ``publish`` returns False. ``on_problem(problem,
        delay_s)``: called on the network thread before each wait for the next attempt,
        with why the last one failed (`waystation.linkproblems`). ``password_provider``:
        asked for the password before each attempt (``password`` is then ignored).
        ``cert_provider``: asked for the client certificate before each attempt (with
        ``tls``; it replaces the context's certificate when it names other files).
        ``on_retained``: called instead of ``on_message`` for a retained message the
        broker sends on subscribe (old news, not what was just published).
        """
        if not client_id:
            raise ValueError("client_id is required (persistent sessions are per client id)")
        self.client_id = client_id
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._on_message_cb = on_message
        self._on_retained_cb = on_retained
        self._on_problem_cb = on_problem
        self._problem: LinkProblem | None = None
        self._username = username
        self._passwords = password_provider
        self._certs = cert_provider if tls is not None else None
        self._ssl: ssl.SSLContext | None = None
        self._cert_loaded: tuple[str, str] | None = None

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._subs: dict[str, int] = {}
        self._sub_state: dict[str, bool] = {}  # topic -> granted (True) / refused (False)
        self._sub_mids: dict[int, list[str]] = {}
        self._connected = False
        self._attempt = 0
        self._relogin = False
        self._last_error: str | None = None
        self._stopping = threading.Event()
        self._clean_stop = True
        self._thread: threading.Thread | None = None

        client = _CountingClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if tls is not None:
            self._ssl = ssl_context(tls)
            if tls.cert and tls.key:
                self._cert_loaded = (tls.cert, tls.key)
            client.tls_set_context(self._ssl)
            if tls.insecure:
                client.tls_insecure_set(True)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(max_queued)
        client.connect_timeout = connect_timeout
        client.suppress_exceptions = True
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = self._handle_socket_open
        # With these set, paho never writes to the socket from the caller's thread (it
        # would, without a loop_start() thread); only our network thread does.
        client.on_socket_register_write = _ignore_socket
        client.on_socket_unregister_write = _ignore_socket
        self._client = client
        self._counting = client

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        client_id: str,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> MqttLink:
        """Build from a ``waystation.config.MqttConfig`` (read by attribute).

        The username defaults to ``client_id`` (a device logs in as itself); the
        password comes from ``cfg.resolved_password(env)`` when the config has it.
        ``kwargs`` are passed on (will, callbacks, backoff, ...).
        """
        options = link_options(cfg, client_id=client_id, env=env)
        options.update(kwargs)
        return cls(client_id=client_id, **options)

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection (CONNACK 0) and it stands."""
        return self._connected

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or the last connection ended."""
        return self._last_error

    @property
    def tcp_nodelay(self) -> bool | None:
        """TCP_NODELAY on the current socket (None while there is none)."""
        sock: Any = self._client.socket()
        if sock is None:
            return None
        try:
            return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except OSError:
            return None

    @property
    def bytes_in(self) -> int:
        """Bytes read from the broker's connections so far (every connection, partial
        packets included): on a slow link a big message takes a minute to arrive, and
        this is how a waiting device sees that its answer is on the way."""
        return self._counting.bytes_in

    def start(self) -> None:
        """Start the network thread (connects, then keeps reconnecting until ``stop``)."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("MqttLink.start() called twice")
            self._client.connect_async(self.host, self.port, keepalive=self.keepalive)
            self._thread = threading.Thread(
                target=self._run, name=f"mqtt-{self.client_id}", daemon=True
            )
            self._thread.start()

    def stop(self, clean: bool = True, timeout: float = 5.0) -> None:
        """Stop the link and its thread; idempotent.

        ``clean``: send DISCONNECT, so the broker discards the will. ``clean=False``
        drops the TCP connection without a word (as a crash or a lost network would),
        so the broker publishes the will; meant for tests.
        """
        with self._lock:
            self._clean_stop = clean
            self._stopping.set()
            thread = self._thread
        if thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("MqttLink.stop() cannot be called from one of its callbacks")
        # Wake the network thread now rather than at its next select() timeout.
        if clean:
            self._client.disconnect()
        else:
            self._abort_socket()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("mqtt network thread did not stop in time", client_id=self.client_id)

    def __enter__(self) -> MqttLink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def relogin(self) -> None:
        """Drop the connection cleanly (no last will) so that the next attempt, at
        once, logs in with what the password provider says now; the session stays."""
        with self._lock:
            if self._thread is None or self._stopping.is_set():
                return
            self._attempt = 0
            self._relogin = True
        self._client.disconnect()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or ``timeout`` seconds pass (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._connected, timeout)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after any reconnect that lost the session."""
        with self._lock:
            self._subs[topic] = qos
            self._sub_state.pop(topic, None)
            if self._connected:
                self._send_subscribe([(topic, qos)])

    def wait_subscribed(self, topic: str, timeout: float) -> bool:
        """Block until the broker answered the subscription: True if granted, False if
        refused or no answer within ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: topic in self._sub_state, timeout)
            return self._sub_state.get(topic, False)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand one message to the connection; thread-safe.

        True: sent, or waiting only for an in-flight slot (paho resends it after a
        reconnect until the broker PUBACKs it). False: not connected, or paho's queue is
        full: nothing was queued, keep the message and try later.
        """
        if not self._connected:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS


class _CountingClient(paho.Client):
    """paho's client counting the bytes it reads (paho tells only whole packets)."""

    bytes_in = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        data = super()._sock_recv(bufsize)
        self.bytes_in += len(data)  # only the network thread reads: no lock needed
        return data


def _ignore_socket(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho socket (un)register-write hook: our own loop() polls for writability."""
