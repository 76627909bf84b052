"""The compact encodings zd1, zd2 and zd3 of docs/PROTOCOL.md §3 and §11, written from the
text alone, for tests/e2e/protocol_device.py.

Like that device it uses the standard library only (json, tomllib, zlib) - nothing from
agent/, schemas/ or waystation/ - and takes the zd1 dictionary from the file the text
names (`schemas/zd1.dict`), as a device in another language would. The zd2 dictionary is
derived from the collection-schema file the device runs (TOML) by the rules of §3
"Schema dictionary"; the zd3 references are kept by the rules of §3 "Recent traffic".
Where those rules and the server disagree, the server refuses (zd2 not agreed,
`malformed`, `dictionary_unknown`), and the e2e tests see it.

    codec = ZdCodec(schema_text)           # the device's schema file (TOML)
    codec.zd_id                            # hello.zd (§7.1)
    codec.agree(welcome["caps"])           # what §7.11 agreed
    payload, how = codec.encode(plaintext, changes_first_n=n)   # up (changes: zd3)
    codec.answered(n)                      # an ack / reject named change n (§3 zd3)
    plaintext, how = codec.decode(payload) # down: plain, zlib or zd1
"""

from __future__ import annotations

import tomllib
import zlib
from pathlib import Path
from typing import Any

__all__ = ["ZD1", "ZD1_ID", "ZdCodec", "first_n", "schema_dictionary"]

ZD1 = (Path(__file__).resolve().parents[2] / "schemas" / "zd1.dict").read_bytes()
"""§3 "Preset dictionary": the file schemas/zd1.dict taken as raw bytes."""
ZD1_ID = 0x9C7C84A4
"""Its DICTID, as the text states (checked against the file below)."""
FDICT = 0x20
"""RFC 1950: bit 5 of the header's second byte says a 4-byte DICTID follows."""
SCHEMA_PART_MAX = 24 * 1024
"""§3 "Schema dictionary": the schema part is cut to 24 KiB."""
REFERENCE_MAX = 2048
"""§3 "Recent traffic": a reference is a `changes` plaintext of at most 2,048 bytes."""
REFERENCES_USED = 4
"""The device uses its last 1 to 4 references..."""
WAITING_MAX = 4
"""...and only while fewer than 4 reference-sized messages wait for an answer."""
UNKNOWN_MAX = 3
"""After three `dictionary_unknown` answers on one connection it stops using zd3."""

if len(ZD1) != 1366 or zlib.adler32(ZD1) != ZD1_ID:
    raise RuntimeError("schemas/zd1.dict is not the dictionary PROTOCOL.md §3 describes")


def schema_dictionary(schema_text: str) -> bytes:
    """The zd2 dictionary of a collection-schema file (§3 "Schema dictionary"): the zd1
    dictionary followed by, per collection in the schema's order, its skeleton and field
    groups; the schema part cut to 24 KiB."""
    schema = tomllib.loads(schema_text)
    part = bytearray()
    for name, collection in schema.get("collections", {}).items():
        lww: list[str] = []
        counters: list[str] = []
        sets: list[str] = []
        for field, spec in collection.get("fields", {}).items():
            kind = spec.get("type")
            merge = spec.get("merge", "lww")
            if kind == "set" or merge == "set":
                sets.append(f'"{field}":["')
            elif merge == "counter":
                counters.append(f'"{field}":1')
            else:   # lww and manual
                lww.append(f'"{field}":"' if kind == "string" else f'"{field}":')
        part += f'"c":"{name}","k":"","s":"","b":0,"op":"put"'.encode()
        for group, entries in (("f", lww), ("i", counters), ("a", sets)):
            if entries:
                part += f',"{group}":{{{",".join(entries)}}}'.encode()
    return ZD1 + bytes(part[:SCHEMA_PART_MAX])


def _deflate(data: bytes, dictionary: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, dictionary)
    return co.compress(data) + co.flush()


class ZdCodec:
    """One device's side of zd1/zd2/zd3: what was agreed, its references (zd3), and the
    encoding of each payload. Not thread-safe: the device calls it under its lock."""

    def __init__(self, schema_text: str | None) -> None:
        self.zd2 = schema_dictionary(schema_text) if schema_text is not None else None
        self.zd_id = zlib.adler32(self.zd2) if self.zd2 is not None else None
        self.agreed: set[str] = set()
        self.references: list[tuple[int, bytes]] = []
        """(first change n, plaintext) of answered reference-sized `changes`, oldest first."""
        self.waiting: list[tuple[int, bytes]] = []
        """Reference-sized `changes` sent and not yet answered, in the order sent."""
        self.unknown = 0
        """`dictionary_unknown` answers on this connection."""

    # ------------------------------------------------------------------ agreement

    def agree(self, caps: list[str]) -> None:
        """The `welcome`'s caps (§7.11). A new connection starts with nothing agreed
        (`reset_connection`); references are kept (§3: while the zd2 dictionary stays)."""
        self.agreed = set(caps)

    def reset_connection(self) -> None:
        self.agreed = set()
        self.unknown = 0

    @property
    def zd3_on(self) -> bool:
        return "zd3" in self.agreed and "zd2" in self.agreed and self.unknown < UNKNOWN_MAX

    # ------------------------------------------------------------------ up

    def encode(self, plaintext: bytes, *, changes_first_n: int | None = None
               ) -> tuple[bytes, str]:
        """The payload for one up message, and how it was encoded ("plain", "zd1",
        "zd2", "zd3"). `changes_first_n`: the message is a `changes`, whose first change
        has that n (a zd3 reference candidate)."""
        how, dictionary = "plain", b""
        if "zd2" in self.agreed and self.zd2 is not None:
            how, dictionary = "zd2", self.zd2
            if changes_first_n is not None and self.zd3_on:
                refs = [text for _, text in self.references[-REFERENCES_USED:]]
                if refs and len(self.waiting) < WAITING_MAX:
                    how, dictionary = "zd3", self.zd2 + b"".join(refs)
        elif "zd1" in self.agreed:
            how, dictionary = "zd1", ZD1
        if changes_first_n is not None:
            # sent again: the newest copy replaces the older one among those waiting,
            # and one that was a reference stops being one until answered (§3)
            self.waiting = [w for w in self.waiting if w[0] != changes_first_n]
            self.references = [r for r in self.references if r[0] != changes_first_n]
            if len(plaintext) <= REFERENCE_MAX:
                self.waiting.append((changes_first_n, plaintext))
        if how == "plain":
            return plaintext, how
        packed = _deflate(plaintext, dictionary)
        return (packed, how) if len(packed) < len(plaintext) else (plaintext, "plain")

    def answered(self, n: int) -> None:
        """An `ack` or `reject` named change n: the waiting message whose first change it
        is becomes the newest reference; those sent before it, still unanswered, are
        lost; an older reference with the same first change is replaced (§3 "Recent
        traffic")."""
        for index, (first, text) in enumerate(self.waiting):
            if first == n:
                del self.waiting[:index + 1]
                self.references = [r for r in self.references if r[0] != n]
                self.references.append((first, text))
                del self.references[:-REFERENCES_USED]
                return

    def dictionary_unknown(self) -> None:
        """The server does not hold our references: forget them (and what waits)."""
        self.references.clear()
        self.waiting.clear()
        self.unknown += 1

    # ------------------------------------------------------------------ down

    def decode(self, payload: bytes) -> tuple[bytes, str]:
        """A down payload's JSON text, and how it came ("plain", "zlib", "zd1").
        Raises ValueError for a dictionary it does not know (§3: `malformed`)."""
        if payload[:1] != b"\x78":
            return payload, "plain"
        if len(payload) >= 2 and payload[1] & FDICT:
            wanted = int.from_bytes(payload[2:6], "big")
            if wanted != ZD1_ID:
                raise ValueError(f"a stream for unknown dictionary {wanted:#010x}")
            do = zlib.decompressobj(zdict=ZD1)
            how = "zd1"
        else:
            do = zlib.decompressobj()
            how = "zlib"
        out = do.decompress(payload, 1 << 20) + do.flush()
        if not do.eof or do.unused_data or do.unconsumed_tail:
            raise ValueError("a broken or oversized zlib stream")
        return out, how


def first_n(message: dict[str, Any]) -> int | None:
    """The n of a `changes` message's first change (its zd3 name), else None."""
    if message.get("type") != "changes" or not message.get("ch"):
        return None
    n = message["ch"][0].get("n")
    return n if isinstance(n, int) else None
