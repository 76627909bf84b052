"""The optional protocol features this server serves (PROTOCOL.md §11).

A device lists the features it speaks in `hello.caps`; the server answers with `welcome`
naming the ones both sides speak, and keeps them in the device's row so that it sends a
device nothing it did not agree to. A feature joins `SERVER_CAPS` in the commit that
implements it on the server.
"""

from __future__ import annotations

from collections.abc import Iterable

SERVER_CAPS: frozenset[str] = frozenset({"sync"})

COMMAND_CAPS: dict[str, str] = {"sync": "sync"}
"""Commands newer than protocol v1 and the feature a device must have agreed to get one
(PROTOCOL.md §7.9): `sync` only reaches an agent that knows it."""


def deliverable(cmd: str, caps: Iterable[str]) -> bool:
    """Whether command `cmd` may be sent to a device that agreed `caps`."""
    need = COMMAND_CAPS.get(cmd)
    return need is None or need in caps


def agreed(offered: Iterable[str]) -> tuple[str, ...]:
    """The features both the device (`offered`) and this server speak, sorted."""
    return tuple(sorted(set(offered) & SERVER_CAPS))


__all__ = ["COMMAND_CAPS", "SERVER_CAPS", "agreed", "deliverable"]
