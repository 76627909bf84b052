"""The devices' recent traffic the server reads `zd3` streams with (PROTOCOL.md §3).

One `schemas.zdict_recent.ServerRefs` per device that agreed to `zd3`, in memory only:
what it holds is an optimisation of bytes, never needed for correctness. A device whose
references are gone (a restart, the bound below, another server read its messages) gets
`dictionary_unknown` for a stream made with them and sends again with `zd2`.

Bounded: at most `limit` bytes of references in all (least recently used device dropped
first), so no number of devices or messages grows the server's memory past it. Only
messages the server decoded feed it: a device cannot add references by naming them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from broker.server.store.base import DeviceRow
from schemas import zdict, zdict_recent, zdict_schema
from schemas.codes import DICTIONARY_UNKNOWN
from schemas.errors import ProtocolError
from schemas.payload import inflate, is_zlib
from schemas.zdict_recent import ServerRefs
from waystation.config.server import ServerConfig


class RecentTraffic:
    """Per device references, bounded by `limit` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._devices: OrderedDict[str, ServerRefs] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self.hits = 0
        """Streams read with a device's references (metrics)."""
        self.misses = 0
        """Streams whose references were not found: `dictionary_unknown` (metrics)."""

    def open(self, dev: str, base: bytes) -> None:
        """`dev` agreed to zd3 with `base` (its `zd2` dictionary): keep its references,
        unless they were made on another base (a new schema version)."""
        with self._lock:
            held = self._devices.get(dev)
            if held is None or held.base != base:
                self._set(dev, ServerRefs(base))

    def tracked(self, dev: str) -> bool:
        with self._lock:
            return dev in self._devices

    def add(self, dev: str, first_n: int, plain: bytes) -> None:
        """`dev` sent a `changes` message (first change `first_n`, JSON `plain`)."""
        with self._lock:
            refs = self._devices.get(dev)
            if refs is None:
                return
            refs.add(first_n, plain)
            self._set(dev, refs)

    def find(self, dev: str, dict_id: int) -> bytes | None:
        """The dictionary of `dev`'s references with id `dict_id`, or None."""
        with self._lock:
            refs = self._devices.get(dev)
            found = None if refs is None else refs.find(dict_id)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._devices.move_to_end(dev)
            return found

    def forget(self, dev: str) -> None:
        with self._lock:
            if dev in self._devices:
                del self._devices[dev]
                self._bytes -= self._sizes.pop(dev)

    @property
    def bytes(self) -> int:
        return self._bytes

    def to_json(self) -> dict[str, int]:
        """For `server status`-like readers and the metrics endpoint."""
        with self._lock:
            return {"devices": len(self._devices), "bytes": self._bytes, "limit": self.limit,
                    "read": self.hits, "unknown": self.misses}

    def __len__(self) -> int:
        return len(self._devices)

    def _set(self, dev: str, refs: ServerRefs) -> None:
        size = refs.size + 64  # the base is the catalog's bytes, shared by all devices
        self._bytes += size - self._sizes.get(dev, 0)
        self._sizes[dev] = size
        self._devices[dev] = refs
        self._devices.move_to_end(dev)
        # Even the device just added goes when it alone is over the limit (a limit below
        # one device's references): the bound holds, and the device is refused
        # `dictionary_unknown` and sends with `zd2`, as after a restart.
        while self._bytes > self.limit and self._devices:
            old, _ = self._devices.popitem(last=False)
            self._bytes -= self._sizes.pop(old)




def read_plain(recent: RecentTraffic, dev: str, device: DeviceRow | None, payload: bytes,
               limit: int) -> bytes | None:
    """The JSON text of `payload` from `dev` when the server keeps `dev`'s traffic (it
    agreed to `zd3`): a stream made with its references inflated with them, any other
    read as always. None: not such a device (the codec reads the payload as it is).
    Raises `ProtocolError` (`dictionary_unknown` for references it does not hold)."""
    zd3 = recent.tracked(dev) or (device is not None and zdict_recent.CAP in device.caps)
    if not zd3:
        return None
    if not is_zlib(payload):
        return payload
    wanted = zdict.wants_dictionary(payload)
    if wanted is None or wanted < 0:
        return inflate(payload, limit)
    known = zdict_schema.lookup(wanted)
    if known is not None:
        if not recent.tracked(dev) and wanted != zdict.DICT_ID:
            # Its references were dropped (bound, restart): a zd2 stream starts them again.
            recent.open(dev, known)
        return inflate(payload, limit, dictionary=known)
    found = recent.find(dev, wanted)
    if found is None:
        raise ProtocolError(DICTIONARY_UNKNOWN, "this server does not hold the recent "
                                                "messages this stream was compressed with "
                                                f"(dictionary id {wanted}): send it again "
                                                "compressed with zd2")
    return inflate(payload, limit, dictionary=found)




def recent_traffic(config: ServerConfig) -> RecentTraffic | None:
    """The server's references cache, or None where `zd3` is switched off
    (`merge.recent_dictionary_bytes = 0`). Where several servers share the devices'
    messages (`shared_group`, RabbitMQ's queue) a device's next message often reaches a
    server that did not read its last ones: it is refused and sent again with `zd2`,
    and after three such refusals on one connection the device stops using `zd3` until
    it reconnects (agent.up_packing); such fleets may switch it off."""
    limit = config.merge.recent_dictionary_bytes
    return RecentTraffic(limit) if limit else None

__all__ = ["RecentTraffic", "read_plain", "recent_traffic"]
