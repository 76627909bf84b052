"""How this device compresses what it sends: the dictionaries agreed with the server
(capabilities `zd1`, `zd2`, `zd3`; PROTOCOL.md §3 and §11).

- `zd1`: the protocol's dictionary, every message (`schemas.zdict`);
- `zd2`: the dictionary derived from the device's schema, named in `hello.zd`
  (`schemas.zdict_schema`);
- `zd3`: for `changes`, the `zd2` dictionary followed by the device's last answered
  change messages (`schemas.zdict_recent`). The references outlive a reconnect (the
  server keeps them too) and are forgotten when the server says it does not hold them;
  after `MAX_MISSES` such answers on one connection the device stops using `zd3` until
  the next `welcome` (the server keeps losing them: restarts, several servers).

Nothing is used on the wire before the `welcome` that agreed to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from agent.caps import ZD2, ZD3, ZDICT
from schemas import zdict, zdict_schema
from schemas.collection import Catalog
from schemas.encoding import compress
from schemas.zdict_recent import DeviceRefs

MAX_MISSES: Final = 3


class UpPacking:
    """The dictionaries in use on this connection."""

    def __init__(self) -> None:
        self._hello_zd: bytes | None = None
        """The schema dictionary whose id the latest `hello` named (zd2)."""
        self._up_zd: bytes | None = None
        """The schema dictionary the server agreed to read (None: not agreed)."""
        self._zd1 = False
        self._agreed = False
        self._recent: DeviceRefs | None = None
        self._misses = 0

    def hello_zd(self, catalog: Catalog) -> int:
        """The id of the schema dictionary, for `hello.zd`."""
        self._hello_zd = zdict_schema.dictionary(catalog)
        return zdict_schema.dict_id(self._hello_zd)

    def welcome(self, caps: frozenset[str] | None) -> None:
        """The server agreed to `caps` (None: no `welcome` on this connection yet; the
        references are kept for the next)."""
        self._agreed = caps is not None
        if caps is None:
            return
        self._zd1 = ZDICT in caps
        self._up_zd = self._hello_zd if ZD2 in caps else None
        self._misses = 0
        if ZD3 in caps and self._up_zd is not None:
            if self._recent is None or self._recent.base != self._up_zd:
                self._recent = DeviceRefs(self._up_zd)
        else:
            self._recent = None

    def packing(self) -> bool | bytes:
        """`zdict` of `codec.encode` for messages other than `changes`: the schema
        dictionary (zd2), else the protocol's (zd1), else as v1."""
        if not self._agreed:
            return False
        if self._up_zd is not None:
            return self._up_zd
        return self._zd1

    def changes(self, first_n: int, plain: bytes, compress_over: int | None) -> bytes:
        """The wire bytes of a `changes` message whose JSON text is `plain`."""
        recent = self._recent
        if recent is None:
            return compress(plain, compress_over, self.packing())
        dictionary = recent.dictionary()
        # Sent however it is encoded, the server keeps it too (the rules of §3).
        recent.sent(first_n, plain)
        if not self._agreed:  # references kept from the last connection: not yet agreed
            return compress(plain, compress_over, self.packing())
        return zdict.pack(plain, dictionary if dictionary is not None else recent.base)

    @property
    def recent_in_use(self) -> bool:
        return self._recent is not None

    def answered(self, numbers: Iterable[int]) -> None:
        """The server answered these changes: the messages they opened are references."""
        if self._recent is not None:
            self._recent.answered(numbers)

    def dictionary_unknown(self) -> bool:
        """The server does not hold this device's references (`dictionary_unknown`): start
        again from `zd2`, or stop using `zd3` on this connection after `MAX_MISSES`.
        True when `zd3` was in use (what is in flight should go again at once)."""
        if self._recent is None:
            return False
        self._misses += 1
        self._recent.reset()
        if self._misses >= MAX_MISSES:
            self._recent = None
        return True

    def malformed(self) -> bool:
        """The server could not read a message (`malformed`): stop using the schema
        dictionary and the references on this connection (back to zd1). True when
        either was in use."""
        used = self._up_zd is not None
        self._up_zd = None
        self._recent = None
        return used


__all__ = ["MAX_MISSES", "UpPacking"]
