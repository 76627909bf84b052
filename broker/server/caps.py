"""The optional protocol features this server serves (PROTOCOL.md §11).

A device lists the features it speaks in `hello.caps`; the server answers with `welcome`
naming the ones both sides speak, and keeps them in the device's row so that it sends a
device nothing it did not agree to. A feature joins `SERVER_CAPS` in the commit that
implements it on the server.
"""

from __future__ import annotations

from collections.abc import Iterable

SERVER_CAPS: frozenset[str] = frozenset({"scopes"})
"""scopes: `waystation device scopes` reaches the device as a `scopes` command (§7.9)."""


def agreed(offered: Iterable[str]) -> tuple[str, ...]:
    """The features both the device (`offered`) and this server speak, sorted."""
    return tuple(sorted(set(offered) & SERVER_CAPS))


__all__ = ["SERVER_CAPS", "agreed"]
