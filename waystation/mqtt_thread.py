"""The network thread of `waystation.mqtt.MqttLink`: connect, run paho's loop until the
connection ends, reconnect after a jittered backoff until a stop, and paho's callbacks
(which run on this thread: they note the state under the link's lock and hand events
to the user's callbacks, whose exceptions are logged and swallowed)."""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode

from waystation import linkproblems
from waystation import mqtt_hooks as hooks
from waystation.backoff import Backoff, backoff_delay
from waystation.linkproblems import LinkProblem

log = structlog.get_logger("waystation.mqtt")

_LOOP_TIMEOUT_S = 1.0


class NetworkThread:
    """Mixed into `MqttLink` (which sets the attributes declared here)."""

    client_id: str
    host: str
    port: int
    connect_timeout: float
    backoff: Backoff
    _rng: random.Random
    _client: paho.Client
    _on_connect_cb: hooks.OnConnect | None
    _on_disconnect_cb: hooks.OnDisconnect | None
    _on_message_cb: hooks.OnMessage | None
    _on_retained_cb: hooks.OnMessage | None
    _on_problem_cb: hooks.OnProblem | None
    _problem: LinkProblem | None
    _username: str | None
    _passwords: hooks.PasswordProvider | None
    _certs: hooks.CertProvider | None
    _ssl: ssl.SSLContext | None
    _cert_loaded: tuple[str, str] | None
    _lock: threading.RLock
    _changed: threading.Condition
    _subs: dict[str, int]
    _sub_state: dict[str, bool]
    _sub_mids: dict[int, list[str]]
    _connected: bool
    _attempt: int
    _relogin: bool
    _last_error: str | None
    _stopping: threading.Event
    _clean_stop: bool

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._problem = None
            try:
                if self._passwords is not None and self._username is not None:
                    self._client.username_pw_set(self._username, self._passwords.password())
                self._load_cert()
                self._client.reconnect()
            except Exception as exc:  # OSError, ssl.SSLError, socket.timeout, ...
                self._problem = linkproblems.from_exception(exc)
                self._set_error(f"cannot connect to {self.host}:{self.port}: {exc}")
                if self._certs is not None:
                    self._call(self._certs.refused)
            else:
                self._pump()
            if self._stopping.is_set():
                break
            with self._lock:
                relogin, self._relogin = self._relogin, False
            if relogin:
                continue
            delay = backoff_delay(self._attempt, self.backoff, self._rng)
            self._attempt += 1
            problem = self._problem or LinkProblem("disconnected", self._last_error or "")
            self._call(self._on_problem_cb, problem, delay)
            log.debug("mqtt reconnect scheduled", client_id=self.client_id,
                      delay_s=round(delay, 3), reason=self._last_error)
            self._stopping.wait(delay)
        self._finish()

    def _pump(self) -> None:
        """Run paho's loop until the connection ends or a stop is requested."""
        started = time.monotonic()
        # Whether this connection was ever accepted: once it was, its end (a stop's
        # DISCONNECT, a relogin, the broker closing it) is no failed attempt and the
        # connect timeout no longer applies.
        accepted = False
        while not self._stopping.is_set():
            try:
                rc = self._client.loop(timeout=_LOOP_TIMEOUT_S)
            except Exception as exc:
                log.exception("mqtt network loop failed", client_id=self.client_id)
                self._set_error(f"network loop failed: {exc}")
                self._abort_socket()
                rc = MQTTErrorCode.MQTT_ERR_UNKNOWN
            accepted = accepted or self._connected
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                reason = f"connection ended ({paho.error_string(rc)})"
                if (not accepted and not self._relogin
                        and not (self._last_error or "").startswith("broker")):
                    self._set_error(f"{reason} before the broker accepted it")
                    if self._certs is not None:
                        # TLS 1.3: a refused client certificate ends the connection
                        # after the client's side of the handshake completed.
                        self._call(self._certs.refused)
                self._mark_down(reason)
                return
            if not accepted and time.monotonic() - started > self.connect_timeout:
                self._problem = LinkProblem("timeout", "no CONNACK")
                self._set_error(f"no CONNACK from {self.host}:{self.port} "
                                f"within {self.connect_timeout} s")
                self._abort_socket()

    def _load_cert(self) -> None:
        """Put the certificate the provider chooses into the TLS context (new
        connections take it; the live one, if any, keeps its own)."""
        if self._certs is None or self._ssl is None:
            return
        files = self._certs.cert_files()
        if files is None or files == self._cert_loaded:
            return
        try:
            self._ssl.load_cert_chain(files[0], files[1])
        except (OSError, ssl.SSLError) as exc:
            log.warning("client certificate unusable", client_id=self.client_id,
                        cert=files[0], error=str(exc))
            self._call(self._certs.refused)
            return
        self._cert_loaded = files

    def _finish(self) -> None:
        """After a stop request: leave the broker the requested way, then close."""
        if self._client.socket() is not None:
            if self._clean_stop:
                self._client.disconnect()
            else:
                self._abort_socket()
            deadline = time.monotonic() + 2.0
            while self._client.socket() is not None and time.monotonic() < deadline:
                try:
                    if self._client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
                except Exception:
                    break
        self._mark_down("stopped")

    def _abort_socket(self) -> None:
        """Drop the TCP connection without DISCONNECT (the broker sees it die)."""
        sock = self._client.socket()
        if sock is None:
            return
        shutdown = getattr(sock, "shutdown", None)  # paho types it as a generic SocketLike
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)

    def _send_subscribe(self, subs: list[tuple[str, int]]) -> None:
        # caller holds self._lock, so the SUBACK cannot be handled before the mid is noted
        for topic, qos in subs:
            rc, mid = self._client.subscribe(topic, qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._sub_mids[mid] = [topic]

    def _mark_down(self, reason: str) -> None:
        with self._changed:
            was_up = self._connected
            self._connected = False
            self._sub_mids.clear()
            self._changed.notify_all()
        if was_up:
            self._last_error = reason
            log.info("mqtt disconnected", client_id=self.client_id, reason=reason)
            self._call(self._on_disconnect_cb, reason)

    def _set_error(self, reason: str) -> None:
        if reason != self._last_error:
            log.warning("mqtt connection attempt failed", client_id=self.client_id,
                        reason=reason)
        self._last_error = reason

    def _call(self, callback: Callable[..., object] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("mqtt callback raised", client_id=self.client_id,
                          callback=getattr(callback, "__name__", repr(callback)))

    # ----------------------------------------------------- paho callbacks (network thread)

    def _handle_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as exc:
            log.warning("could not set TCP_NODELAY", client_id=self.client_id, error=str(exc))

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            self._problem = linkproblems.from_connack(str(reason))
            self._set_error(f"broker refused the connection: {reason}")
            if self._problem.kind == "login_refused" and self._passwords is not None:
                self._call(self._passwords.refused)
            if self._certs is not None:
                self._call(self._certs.refused)
            return
        if self._passwords is not None:
            self._call(self._passwords.accepted)
        if self._certs is not None:
            self._call(self._certs.accepted)
        session_present = bool(flags.session_present)
        with self._changed:
            # Every time, session or not (module docstring: brokers lose subscriptions
            # of kept sessions, Mosquitto its shared ones).
            self._sub_state.clear()
            self._send_subscribe(list(self._subs.items()))
            self._connected = True
            self._attempt = 0
            self._last_error = None
            self._changed.notify_all()
        log.info("mqtt connected", client_id=self.client_id, host=self.host, port=self.port,
                 session_present=session_present)
        self._call(self._on_connect_cb, session_present)

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._mark_down(str(reason))

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # A retained message sent on subscribe (retain 1) is old news to an owner that
        # tells it apart (`on_retained`); live ones, also those a broker queued in the
        # session while the link was down, come with retain 0 (MQTT 3.1.1 §3.3.1.3).
        retained = msg.retain and self._on_retained_cb is not None
        self._call(self._on_retained_cb if retained else self._on_message_cb, msg.topic,
                   bytes(msg.payload))

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any
    ) -> None:
        with self._changed:
            topics = self._sub_mids.pop(mid, [])
            for topic, reason in zip(topics, reasons, strict=False):
                granted = not reason.is_failure
                self._sub_state[topic] = granted
                if not granted:
                    log.warning("mqtt subscription refused", client_id=self.client_id,
                                topic=topic)
            self._changed.notify_all()


__all__ = ["NetworkThread"]
