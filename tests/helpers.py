"""Small helpers shared by tests: waiting on conditions, free ports, a recording MQTT client.

No test sleeps and hopes: it waits for a condition with a deadline (``wait_until``), and
proves that something did *not* happen by waiting for a later marker that must arrive
after it (MQTT keeps one publisher's messages in order).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.ports import free_port

__all__ = [
    "Received",
    "RecordingClient",
    "free_port",
    "peer_socket_nodelay",
    "port_open",
    "wait_exit",
    "wait_for_progress",
    "wait_until",
]

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    *,
    interval: float = 0.005,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or fail the test
    with AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout} s waiting for: {text}")
        time.sleep(interval)


def wait_for_progress(
    count: Callable[[], int],
    want: int,
    *,
    idle_s: float = 10.0,
    interval: float = 0.01,
    message: str = "progress",
) -> int:
    """Poll ``count()`` until it reaches ``want`` (returned). The deadline is ``idle_s``
    after the count last grew, not after the start: a slow machine that goes on making
    progress passes, one that stalls fails the test (AssertionError) `idle_s` later."""
    last, deadline = count(), time.monotonic() + idle_s
    while last < want:
        if time.monotonic() >= deadline:
            raise AssertionError(f"no progress for {idle_s} s at {last} of {want}: {message}")
        time.sleep(interval)
        now = count()
        if now > last:
            last, deadline = now, time.monotonic() + idle_s
    return last


def wait_exit(proc: subprocess.Popen[Any], timeout: float) -> int:
    """`proc.wait(timeout)`, woken by the exit itself: Popen.wait with a timeout polls,
    sleeping up to 50 ms past the exit each time (every process stop of a test paid
    ~25 ms on average); a pidfd (Linux >= 5.3) becomes readable the moment it ends.
    subprocess.TimeoutExpired as from Popen.wait."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):   # no pidfd here: Popen's own wait
        return proc.wait(timeout)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    return proc.wait(timeout)   # it has ended: reaped at once


def terminate(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """SIGTERM `proc` (if it runs) and wait up to `timeout` s; SIGKILL it if it hangs.
    True when it ended by itself (or had already)."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        wait_exit(proc, timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        return False


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


_SYS_PIDFD_GETFD = 438  # Linux >= 5.6, every architecture


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a broker started through a wrapper script, such
    as rabbitmq-server, holds its sockets in a child: beam.smp)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the comm field may hold spaces; the parent pid follows the closing parenthesis
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def peer_socket_nodelay(pid: int, local_port: int, remote_port: int) -> bool:
    """TCP_NODELAY on the socket that process ``pid`` (or one of its descendants) holds
    for the TCP connection local_port <-> remote_port (IPv4 loopback), read through
    pidfd_getfd(2).

    Raises AssertionError saying which step failed: the look is a check, not optional.
    """
    inode = None
    lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local, remote = fields[1].split(":"), fields[2].split(":")
        if int(local[1], 16) == local_port and int(remote[1], 16) == remote_port:
            inode = fields[9]
            break
    assert inode is not None, f"no TCP connection {local_port} <-> {remote_port} in " \
                              f"/proc/{pid}/net/tcp"
    owner, target = None, None
    for candidate in _process_tree(pid):
        try:
            entries = list(Path(f"/proc/{candidate}/fd").iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                if os.readlink(entry) == f"socket:[{inode}]":
                    owner, target = candidate, int(entry.name)
                    break
            except OSError:
                continue
        if owner is not None:
            break
    assert owner is not None and target is not None, \
        f"no process in the tree of {pid} holds socket inode {inode}"
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(owner)
    try:
        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, target, 0)
    finally:
        os.close(pidfd)
    assert fd >= 0, f"pidfd_getfd(2) failed: {os.strerror(ctypes.get_errno())} " \
                    "(needs CAP_SYS_PTRACE over the broker process)"
    with socket.socket(fileno=fd) as dup:
        return bool(dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@dataclass(frozen=True)
class Received:
    """One message as a test client got it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class _State:
    connacks: list[str] = field(default_factory=list)
    session_present: list[bool] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    pubacks: set[int] = field(default_factory=set)


class RecordingClient:
    """A plain paho client (no Waystation code) that records everything it sees.

    Used to test brokers as any device in any language would meet them.
    """

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        host: str = "127.0.0.1",
        clean_session: bool = True,
        will: tuple[str, bytes, bool] | None = None,
        nodelay: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: connect over TLS with this context (CA, client certificate)."""
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self.state = _State()
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=will[2])
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        if nodelay:
            client.on_socket_open = _set_nodelay
        if tls is not None:
            client.tls_set_context(tls)
        self.client = client

    # -- paho callbacks (network thread)
    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._lock:
            self.state.connacks.append(str(reason))
            self.state.session_present.append(bool(flags.session_present))

    def _on_disconnect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._lock:
            self.state.disconnects.append(str(reason))

    def _on_message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.state.messages.append(
                Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain))
            )

    def _on_subscribe(self, c: Any, u: Any, mid: int, reasons: list[Any], props: Any) -> None:
        with self._lock:
            self.state.subacks[mid] = [r.value for r in reasons]

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            self.state.pubacks.add(mid)

    # -- actions
    def connect(self, timeout: float = 10.0, *, bind_address: str = "") -> str:
        """Connect (from `bind_address`, e.g. 127.0.0.2, when given) and wait for the
        CONNACK; returns its reason ("Success", "Not authorized")."""
        self.client.connect(self.host, self.port, keepalive=30, bind_address=bind_address)
        self.client.loop_start()
        wait_until(lambda: self.state.connacks or self.state.disconnects, timeout,
                   message="CONNACK or disconnect")
        return self.state.connacks[-1] if self.state.connacks else "no CONNACK"

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> int:
        """Subscribe and return the SUBACK code (0/1/2 granted QoS, 128 refused)."""
        _, mid = self.client.subscribe(topic, qos)
        assert mid is not None
        codes = wait_until(lambda: self.state.subacks.get(mid), timeout, message="SUBACK")
        return codes[0]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                timeout: float = 10.0) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_until(lambda: info.mid in self.state.pubacks, timeout, message=f"PUBACK of {topic}")

    def received(self, topic: str | None = None) -> list[Received]:
        """Messages received so far (on ``topic`` only, when given)."""
        with self._lock:
            return [m for m in self.state.messages if topic is None or m.topic == topic]

    def wait_for(self, topic: str, payload: bytes | None = None,
                 timeout: float = 10.0) -> Received:
        """Wait for a message on ``topic`` (with ``payload``, when given) and return it."""
        def found() -> Received | None:
            for m in self.received(topic):
                if payload is None or m.payload == payload:
                    return m
            return None
        return wait_until(found, timeout, message=f"a message on {topic} ({payload!r})")

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (the broker should fire the will)."""
        sock: Any = self.client.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()

    def close(self) -> None:
        """Disconnect cleanly (if connected) and stop the network thread."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def _set_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
