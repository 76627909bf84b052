"""paho-mqtt's network loop on poll() instead of select(), for processes with many sockets.

paho's `Client.loop()` waits in `select.select()`, which cannot watch a descriptor
numbered 1024 or above (FD_SETSIZE): it raises ValueError, which paho reports as "the
connection was lost" before the broker ever saw a CONNECT. One agent per process never
comes near that; a simulator running hundreds of agents (7 descriptors each: LMDB
files, wake sockets, paho's socket pair, the connection) does. `install()` swaps the
`select` module paho's client uses for this poll()-based stand-in (same call, same
errors), in the calling process only.
"""

from __future__ import annotations

import select
from typing import Any

__all__ = ["install"]

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT | select.POLLHUP | select.POLLERR


def _fd(obj: Any) -> int:
    if obj is None:
        raise TypeError("argument must be an int, or have a fileno() method")
    fd = obj if isinstance(obj, int) else obj.fileno()
    if fd < 0:
        raise ValueError("file descriptor cannot be a negative integer")
    return int(fd)


class PollSelect:
    """The part of the `select` module paho's client uses, on poll()."""

    error = select.error

    @staticmethod
    def select(rlist: list[Any], wlist: list[Any], xlist: list[Any],
               timeout: float | None = None) -> tuple[list[Any], list[Any], list[Any]]:
        poller = select.poll()
        masks: dict[int, int] = {}
        for obj in rlist:
            fd = _fd(obj)
            masks[fd] = masks.get(fd, 0) | select.POLLIN | select.POLLPRI
        for obj in wlist:
            fd = _fd(obj)
            masks[fd] = masks.get(fd, 0) | select.POLLOUT
        for fd, mask in masks.items():
            poller.register(fd, mask)
        events = dict(poller.poll(None if timeout is None else max(0.0, timeout) * 1000))
        return ([o for o in rlist if events.get(_fd(o), 0) & _READ],
                [o for o in wlist if events.get(_fd(o), 0) & _WRITE], [])


def install() -> None:
    import paho.mqtt.client as client

    setattr(client, "select", PollSelect())  # noqa: B010  (not an exported name)
