"""Checking, before a daemon starts, that the ports its config names can be listened on.

A port in use is found out at start-up, before the daemon connects to its broker or
opens its store, and reported as one line naming the address and the config key (a
`ListenError`, exit code 4), instead of a traceback or a half-started daemon.
"""

from __future__ import annotations

import errno
import socket

from waystation.errors import ListenError


def check_listen(host: str, port: int, part: str, key: str) -> None:
    """Raise ListenError when nothing could listen on host:port now.

    `part` ("server", "broker") and `key` (e.g. "metrics_port") name the config setting
    of the port in the message, with its environment override. Binds with SO_REUSEADDR
    as the real listeners do, so a port left in TIME_WAIT by a stopped daemon is free.
    """
    key = f"{key} in the {part} config or WAYSTATION_{part.upper()}__{key.upper()}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port} (set by {key}): the address {host!r} "
                          f"does not resolve ({exc.strerror}); fix the host setting") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise ListenError(_message(host, port, key, exc)) from None


def _message(host: str, port: int, key: str, exc: OSError) -> str:
    where = f"cannot listen on {host}:{port} (set by {key})"
    if exc.errno == errno.EADDRINUSE:
        return (f"{where}: the port is in use by another process; stop that process "
                f"(`ss -ltnp 'sport = :{port}'` shows which) or set it to a free port")
    if exc.errno == errno.EACCES:
        return (f"{where}: permission denied (ports below 1024 need privileges); "
                "choose a port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine; fix the host setting"
    return f"{where}: {exc.strerror or exc}"


__all__ = ["check_listen"]
