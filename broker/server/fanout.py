"""Fan-out: the `delta` messages of one engine round, one set per receiving device.

Record states are added per scope with the device that caused them (None for the
operator). Each online device following the scope gets every state of its scopes except
those of its own changes (it gets those in its ack), in the order they were applied.
Devices with the same view get the same bytes, encoded once.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.server.messages import Compression, compress, delta_messages
from broker.server.presence import Presence
from broker.server.registry import Registry

Outgoing = tuple[str, bytes]


class Fanout:
    """Collects delta states, then builds the messages (see module docstring)."""

    def __init__(self, registry: Registry, presence: Presence) -> None:
        self.registry = registry
        self.presence = presence
        self._by_scope: dict[str, list[tuple[str | None, bytes]]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_scope)

    def wants(self, scope: str, origin: str | None) -> bool:
        """Whether any device would receive a state of `scope` from `origin`."""
        online = self.presence.is_online
        return any(d != origin and online(d) for d in self.registry.subscribers(scope))

    def add(self, scope: str, origin: str | None, rec: bytes) -> None:
        """Queue one encoded record state of `scope` caused by `origin`."""
        self._by_scope.setdefault(scope, []).append((origin, rec))

    def messages(self, compress_over: Callable[[str], Compression]) -> list[Outgoing]:
        """The delta messages; `compress_over(dev)` gives the device's compression bound."""
        if not self._by_scope:
            return []  # most groups online: nobody else follows the scope, or no change
        targets: dict[str, list[str]] = {}
        online = self.presence.is_online
        for scope in self._by_scope:
            for dev in self.registry.subscribers(scope):
                if online(dev):
                    targets.setdefault(dev, []).append(scope)
        origins = {s: {origin for origin, _ in entries} for s, entries in self._by_scope.items()}
        cache: dict[tuple[tuple[str, ...], str | None, Compression], list[bytes]] = {}
        out: list[Outgoing] = []
        for dev in sorted(targets):
            scopes = tuple(sorted(targets[dev]))
            own = any(dev in origins[s] for s in scopes)
            over = compress_over(dev)
            key = (scopes, dev if own else None, over)
            msgs = cache.get(key)
            if msgs is None:
                recs = [rec for s in scopes for origin, rec in self._by_scope[s]
                        if origin != dev]
                msgs = [compress(m, over) for m in delta_messages(recs)]
                cache[key] = msgs
            out.extend((dev, m) for m in msgs)
        self._by_scope.clear()
        return out


__all__ = ["Fanout", "Outgoing"]
