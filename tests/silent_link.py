"""A link that can go silent: a network namespace of the test's own, joined to this host
by a veth pair, and a TCP relay on the host's end to a service on 127.0.0.1.

    with SilentLink(target_port=pg.port) as link:
        link.run_in_namespace([...])     # a process that reaches the service at
                                         # link.address:link.port, through the veth
        link.cut()                       # the host's end goes down: packets vanish, no
                                         # reset, no FIN (a cut cable, a firewall that
                                         # drops, a host powered off)
        link.heal()
        with SilentLink(other_port, namespace=link.namespace) as second:
            ...                          # a second path out of the same namespace,
                                         # cut and healed on its own

A relay on 127.0.0.1 could not do this: the kernel acknowledges what it receives, so a
client would never see its data go unanswered. Here the client's own kernel sees no
acknowledgement, as on a real network. Needs root and iproute2 (`ip netns`, veth); the
addresses are a /30 of 10.213.0.0/16 that exists only between this host and the
namespace (nothing leaves the machine).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import random
import shutil
import socket
import subprocess
import termios
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import pytest

from tests.tcp_relay import pump, relay_pairs


def unavailable_reason() -> str | None:
    """Why a SilentLink cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "a network namespace needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


@contextlib.contextmanager
def silent_link(target_port: int, *, namespace: str | None = None) -> Iterator[SilentLink]:
    """A SilentLink to 127.0.0.1:`target_port` for one test (skipped, saying why, where
    none can be made); `namespace`: a second path out of another link's namespace."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with SilentLink(target_port, namespace=namespace) as link:
        yield link


class SilentLink:
    """See module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *,
                 namespace: str | None = None) -> None:
        """`namespace`: join that one (another link's) instead of making one: a second
        path out of it that is cut on its own (its namespace stays when it closes)."""
        self.target = (target_host, target_port)
        tag = f"{os.getpid() % 10000}{random.randrange(10000):04d}"
        self.own_namespace = namespace is None
        self.namespace = namespace or f"wslink{tag}"
        self.host_if = f"wsh{tag}"  # interface names: at most 15 bytes
        self.ns_if = f"wsn{tag}"
        base = random.randrange(1, 255)
        block = random.randrange(0, 64) * 4
        self.address = f"10.213.{base}.{block + 1}"  # the host's end
        self.ns_address = f"10.213.{base}.{block + 2}"
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SilentLink:
        try:
            if self.own_namespace:
                self._ip("netns", "add", self.namespace)
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._ip("link", "set", self.ns_if, "netns", self.namespace)
            self._ip("addr", "add", f"{self.address}/30", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            self._ip("netns", "exec", self.namespace, "ip", "addr", "add",
                     f"{self.ns_address}/30", "dev", self.ns_if)
            self._ip("netns", "exec", self.namespace, "ip", "link", "set", self.ns_if, "up")
            if self.own_namespace:
                self._ip("netns", "exec", self.namespace, "ip", "link", "set", "lo", "up")
            self._start_relay()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        for sock in [*([listener] if listener else []), *sockets]:
            with contextlib.suppress(OSError):
                sock.close()
        # Deleting the namespace deletes its end of the pair, and with it the host's.
        if self.own_namespace:
            subprocess.run(["ip", "netns", "del", self.namespace], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "del", self.host_if], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # ------------------------------------------------------------------ faults

    def cut(self) -> None:
        """Packets between the namespace and this host vanish from now on."""
        self._ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        self._ip("link", "set", self.host_if, "up")

    def unacknowledged(self) -> int:
        """Bytes the host's end sent into the namespace that are not acknowledged yet.

        With none, a cut leaves this side nothing to retransmit: after the heal no
        packet of an old connection reaches the namespace, so none is answered with a
        reset, and the service behind the relay never learns that its client is gone
        (as with a real host whose kernel forgot the connection)."""
        with self._lock:
            sockets = list(self._sockets[0::2])  # (client, upstream) pairs: the clients'
        total = 0
        for sock in sockets:
            out = array.array("i", [0])
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out, True)
                total += out[0]
        return total

    def run_in_namespace(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen[str]:
        """Start `argv` inside the namespace (text mode)."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace, *argv], text=True,
                                **popen)

    # ------------------------------------------------------------------ the relay

    def _start_relay(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.address, 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name="silent-link-accept").start()

    def _accept(self, listener: socket.socket) -> None:
        for client, upstream in relay_pairs(listener, self.target):
            with self._lock:
                if self._listener is None:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True,
                                 name="silent-link-pump").start()

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


__all__ = ["SilentLink", "silent_link", "unavailable_reason"]
