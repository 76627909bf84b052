"""Records sent to a device still on an older schema version, projected down to what it
understands (issue 10 §1).

The server stores records in the names and types of the version it runs. A device
whose latest `hello` announced an older published version `sv` gets every record state
(delta `d`, page `recs`, ack `fx`, rejection `rec`) projected down along the schema
history (`schemas.migrate.project_down`): renamed fields carry their old names,
converted ones their old types, split fields are joined again, and fields the old
version does not know are left out. Messages to devices on the newest version, or on
a version the history does not hold, are passed through untouched (no cost).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import structlog

from broker.server.messages import Compression, compress
from broker.server.upcast import SchemaChain
from schemas import zdict
from schemas.migrate import project_down

log = structlog.get_logger(__name__)

_ZLIB = 0x78
_REC_LISTS = {"delta": "d", "page": "recs", "ack": "fx", "fetched": "recs",
              "fetchedq": "recs"}


class Downcaster:
    """Projects outgoing messages for devices on older versions (see module)."""

    def __init__(self, chain: SchemaChain, version: int) -> None:
        self.chain = chain
        self.version = version

    def wanted(self, sv: int) -> bool:
        return sv < self.version and bool(self.chain.steps_for(sv))

    def project(self, payload: bytes, sv: int, over: Compression) -> bytes:
        """`payload` for a device on `sv` (recompressed past `over` bytes)."""
        steps = self.chain.steps_for(sv)
        base = next((v for v in self.chain.versions if v.row.version == sv), None)
        if not steps or base is None:
            return payload
        data = zdict.unpack(payload) if payload[:1] == bytes([_ZLIB]) else payload
        msg = orjson.loads(data)
        kind = msg.get("type")

        def one(rec: dict[str, Any]) -> dict[str, Any]:
            c = rec.get("c")
            if not isinstance(c, str):
                return rec
            spec = base.catalog.collections.get(c)
            if spec is None:
                return rec
            out = project_down(rec, c, steps, spec.fields)
            return {**rec, **{g: v for g, v in out.items() if v or g in rec}}

        changed = False
        if kind in _REC_LISTS and isinstance(msg.get(_REC_LISTS[kind]), list):
            key = _REC_LISTS[kind]
            msg[key] = [one(r) for r in msg[key]]
            changed = True
        elif kind == "reject" and isinstance(msg.get("rj"), list):
            for rj in msg["rj"]:
                if isinstance(rj.get("rec"), dict):
                    rj["rec"] = one(rj["rec"])
                    changed = True
        if not changed:
            return payload
        return compress(orjson.dumps(msg), over)

    def apply(self, out: list[tuple[str, bytes]], sv_of: Callable[[str], int | None],
              over_of: Callable[[str], Compression]) -> list[tuple[str, bytes]]:
        """Every outgoing (device, payload), projected where the device needs it."""
        result = []
        for dev, payload in out:
            sv = sv_of(dev)
            if sv is not None and self.wanted(sv):
                try:
                    payload = self.project(payload, sv, over_of(dev))
                except Exception:  # a projection bug must not stop the message
                    log.exception("downcast_failed", dev=dev, sv=sv)
            result.append((dev, payload))
        return result


__all__ = ["Downcaster"]
