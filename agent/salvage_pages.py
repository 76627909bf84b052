"""The last resort of `agent salvage`: outbox entries read from the raw pages of data.mdb,
without LMDB's tree.

LMDB writes copy-on-write and puts a transaction's new root (and the catalogue of named
databases) on the highest pages of the file: a data.mdb cut short by a power loss, or
with its last page overwritten, has lost the root, and LMDB reaches none of its
records, although most of its leaf pages are intact. Here every page of the file is
read as bytes (plain reads: no memory map, nothing that can kill the process) and
parsed with LMDB's page layout (lmdb.h / mdb.c, format version 1, 64-bit):

    page header (16 bytes): pgno u64, pad u16, flags u16, lower u16, upper u16
    (an overflow page: flags P_OVERFLOW, then the number of pages as u32)
    leaf page (P_LEAF): lower - 16 bytes of u16 node offsets after the header
    node: lo u16, hi u16, flags u16, ksize u16, key, value (lo | hi << 16 bytes), or with
          F_BIGDATA the u64 number of the overflow page that holds the value

A leaf entry is taken for an outbox entry when its key is 8 bytes (a change number)
and its value is one: JSON whose `ch.n` is that number, or, on an encrypted store, a
value that AES-GCM opens with the outbox's associated data for that key (a value of
another database does not authenticate). The same goes for the journal of acked changes,
to tell which changes were acked.

What the tree would have told and the pages cannot: whether a page is still live. A
freed page keeps the copy of an entry deleted since (an acked change) until LMDB reuses
it; such a change is recognised only when the journal (or the server, agent.salvage)
shows it was acked. `agent.salvage` calls this only for what the tree did not give.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2, _P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
_F_BIGDATA = 0x01
_HDR = 16
_MAGIC = 0xBEEFC0DE
_DEFAULT_PSIZE = 4096

Opener = Callable[[str, int, bytes], bytes | None]
"""(database, change number, value) -> the plain value, or None when it is not one of
that database's (a failed decryption)."""


@dataclass
class PageScan:
    values: dict[int, list[bytes]] = field(default_factory=dict)
    """Values under 8-byte keys (change numbers, feed seqs): raw, every copy found."""
    meta: dict[str, list[bytes]] = field(default_factory=dict)
    """Meta entries found (every version: freed pages keep old ones)."""
    pages: int = 0

    def decode(self, opener: Opener) -> tuple[dict[int, dict[str, Any]], set[int]]:
        """(change number -> outbox entry, the change numbers the journal shows acked)."""
        entries: dict[int, dict[str, Any]] = {}
        acked: set[int] = set()
        for n, values in self.values.items():
            for value in values:
                _take(entries, acked, n, value, opener)
        return entries, acked


def page_size(head: bytes) -> int:
    """The page size a meta page records (LMDB keeps it in the free DB's md_pad)."""
    if len(head) >= 48:
        magic, _version = struct.unpack_from("<II", head, _HDR)
        psize = struct.unpack_from("<I", head, _HDR + 24)[0]
        if magic == _MAGIC and psize in (4096, 8192, 16384, 32768, 65536):
            return int(psize)
    return _DEFAULT_PSIZE


def scan(data_file: Path, meta_keys: tuple[bytes, ...]) -> PageScan:
    """Every outbox entry, journal change number and meta entry the pages give. Each
    page is read on its own (os.pread): a block the disk cannot read (EIO) costs that
    page only."""
    out = PageScan()
    fd = os.open(data_file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        psize = page_size(_pread(fd, _HDR + 64, 0) or b"")
        for pgno in range(2, size // psize):
            page = _pread(fd, psize, pgno * psize)
            if page is None:
                continue
            out.pages += 1
            for key, value in _leaf_nodes(page, pgno, psize, fd):
                if len(key) == 8:
                    out.values.setdefault(int.from_bytes(key, "big"), []).append(value)
                elif key in meta_keys:
                    out.meta.setdefault(key.decode(), []).append(value)
    finally:
        os.close(fd)
    return out


def _pread(fd: int, size: int, offset: int) -> bytes | None:
    try:
        data = os.pread(fd, size, offset)
    except OSError:
        return None
    return data if len(data) == size else None


def _take(entries: dict[int, dict[str, Any]], acked: set[int], n: int, value: bytes,
          opener: Opener) -> None:
    for db in ("outbox", "journal"):
        plain = opener(db, n, value)
        if plain is None:
            continue
        try:
            doc = orjson.loads(plain)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(doc, dict):
            continue
        if db == "outbox" and isinstance(doc.get("ch"), dict) and doc["ch"].get("n") == n:
            entries.setdefault(n, doc)
            return
        entry = doc.get("e")
        if db == "journal" and isinstance(entry, dict) and isinstance(entry.get("ch"), dict) \
                and entry["ch"].get("n") == n:
            acked.add(n)
            return


def _leaf_nodes(page: bytes, pgno: int, psize: int, fd: int) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) nodes of page `pgno` if it is a sane leaf page, else nothing."""
    stored, _pad, flags, lower, upper = struct.unpack_from("<QHHHH", page, 0)
    if stored != pgno or flags & (_P_LEAF | _P_BRANCH | _P_OVERFLOW | _P_META | _P_LEAF2
                                  | _P_SUBP) != _P_LEAF:
        return
    if not _HDR <= lower <= upper <= psize or (lower - _HDR) % 2:
        return
    for i in range((lower - _HDR) // 2):
        ptr = struct.unpack_from("<H", page, _HDR + 2 * i)[0]
        if not upper <= ptr <= psize - 8:
            continue
        lo, hi, nflags, ksize = struct.unpack_from("<HHHH", page, ptr)
        kstart = ptr + 8
        if kstart + ksize > psize:
            continue
        key = page[kstart:kstart + ksize]
        size = lo | (hi << 16)
        value: bytes | None = None
        if nflags & _F_BIGDATA:
            if kstart + ksize + 8 <= psize:
                first = struct.unpack_from("<Q", page, kstart + ksize)[0]
                value = _overflow(fd, first, size, psize)
        elif kstart + ksize + size <= psize:
            value = page[kstart + ksize:kstart + ksize + size]
        if value is not None:
            yield key, value


def _overflow(fd: int, first: int, size: int, psize: int) -> bytes | None:
    """A value kept on overflow pages, or None (beyond a truncated file's end, or not
    an overflow page)."""
    head = _pread(fd, _HDR, first * psize)
    if head is None:
        return None
    stored, _pad, flags = struct.unpack_from("<QHH", head, 0)
    if stored != first or not flags & _P_OVERFLOW or size > (1 << 28):
        return None
    return _pread(fd, size, first * psize + _HDR)


__all__ = ["PageScan", "page_size", "scan"]
