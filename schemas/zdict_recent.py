"""The device's own recent traffic as preset dictionary (capability `zd3`, PROTOCOL.md §3).

With `zd2` a lone change still spells out what the schema cannot know: its store
incarnation, the stamp's clock, and the field *values*, although a device writes the
same routes, customers, statuses and addresses again and again. Both ends of a link
have seen the device's last change messages (the device sent them, the server read
them), so each can use them as dictionary: the `zd2` dictionary followed by the
plaintext of the device's last `REFS` answered `changes` messages, oldest first.

Which messages count is fixed by rules both sides apply to what they already see, so
nothing extra travels:
- a *reference* is the plaintext JSON of a `changes` message of at most `REF_MAX_BYTES`;
- the device takes one once the server answered it (an `ack` or `reject` naming its
  first change number: the server read it), in the order answers arrive, a message
  sent again (same first change number) replacing its older copy as on the server, and
  uses the last `REFS` it took (none at first: then `zd2` alone), only while fewer than
  `KEEP - REFS` of its messages wait for an answer;
- the server keeps the last `KEEP` references each device sent, in the order it read
  them, a later copy of a message (same first change number) replacing the earlier.

A stream names its dictionary by DICTID (adler-32) as any zlib stream does; the server
looks it up among the runs of consecutive references it holds for that device
(`ServerRefs.find`). The rules make the device's run one of them in the usual case;
when it is not (a server restart, a lost answer, several servers sharing a device's
messages) the server cannot read the message and says `dictionary_unknown`, and the
device forgets its references and sends again with `zd2` (`DeviceRefs.reset`): costly
only in bytes, never in changes.

No I/O here: the server's bounded cache of `ServerRefs` is `broker.server.recent`.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final

CAP: Final = "zd3"
"""The capability: the device may compress its `changes` with its recent traffic."""

REF_MAX_BYTES: Final = 2048
"""Plaintext bytes of a `changes` message that may serve as reference (a lone change is
~300-600 bytes; bulk batches compress well on their own)."""

REFS: Final = 4
"""References a device uses: its last 4 answered messages."""

KEEP: Final = 8
"""References the server keeps per device: the device's 4 plus room for messages the
server read whose answers the device has not seen yet (pipelining)."""

MAX_PENDING: Final = 64
"""Sent messages a device remembers while it waits for their answers (the oldest is
forgotten first: a message unanswered that long is resent anyway)."""


def dictionary(base: bytes, refs: Iterable[bytes]) -> bytes:
    """The preset dictionary: `base` (the `zd2` dictionary) then the references, oldest
    first (deflate codes the nearest matches in the fewest bits)."""
    return base + b"".join(refs)


def is_reference(plain: bytes) -> bool:
    return len(plain) <= REF_MAX_BYTES


class DeviceRefs:
    """The device's side: the messages it sent, and the answered ones it compresses with."""

    def __init__(self, base: bytes) -> None:
        self.base = base
        self._pending: dict[int, bytes] = {}
        self._refs: deque[tuple[int, bytes]] = deque(maxlen=REFS)
        self._dict: bytes | None = None

    def sent(self, first_n: int, plain: bytes) -> None:
        """A `changes` message whose first change is `first_n` went out. Sent again
        after its answer (a transient rejection), it stops being a reference now: the
        server moves its copy to the newest place when it reads it, and a stream made
        before our answer arrives must not name the old order (it would miss)."""
        if any(first == first_n for first, _ in self._refs):
            self._refs = deque((r for r in self._refs if r[0] != first_n), maxlen=REFS)
            self._dict = None
        if not is_reference(plain):
            self._pending.pop(first_n, None)
            return
        self._pending.pop(first_n, None)  # re-inserted last: the newest copy counts
        self._pending[first_n] = plain
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    def answered(self, numbers: Iterable[int]) -> None:
        """The server answered changes `numbers` (an `ack` or a `reject`). Messages sent
        before an answered one and still unanswered are forgotten: the server answers a
        device's messages in the order it reads them, so theirs were lost (they go
        again, as new messages)."""
        for n in numbers:
            if n not in self._pending:
                continue
            while True:
                first, plain = next(iter(self._pending.items()))
                del self._pending[first]
                if first == n:
                    break
            # A copy of an earlier reference (a transient rejection, sent again): the
            # server moved its copy to the newest place (ServerRefs.add); so do we.
            for ref in [r for r in self._refs if r[0] == n]:
                self._refs.remove(ref)
            self._refs.append((n, plain))
            self._dict = None

    def dictionary(self) -> bytes | None:
        """The dictionary to compress the next message with; None: no reference yet,
        or so many messages unanswered that the server may have read `KEEP - REFS`
        messages past the references and dropped them."""
        if not self._refs or len(self._pending) >= KEEP - REFS:
            return None
        if self._dict is None:
            self._dict = dictionary(self.base, (plain for _, plain in self._refs))
        return self._dict

    def reset(self) -> None:
        """Forget every reference (the server could not read a message made with them)."""
        self._pending.clear()
        self._refs.clear()
        self._dict = None

    @property
    def size(self) -> int:
        return len(self._refs)


class ServerRefs:
    """The server's side for one device: its last `KEEP` references as read."""

    __slots__ = ("_base_check", "_refs", "base")

    def __init__(self, base: bytes) -> None:
        self.base = base
        self._base_check = zlib.adler32(base)  # every lookup continues from it
        self._refs: list[tuple[int, bytes]] = []

    def add(self, first_n: int, plain: bytes) -> None:
        """The server read a `changes` message (first change `first_n`) of this device."""
        refs = [r for r in self._refs if r[0] != first_n]
        if is_reference(plain):
            refs.append((first_n, plain))
        self._refs = refs[-KEEP:]

    def find(self, dict_id: int) -> bytes | None:
        """The dictionary made of a run of up to `REFS` consecutive references whose
        adler-32 is `dict_id`; newest runs first (the usual case costs one check)."""
        plains = [p for _, p in self._refs]
        start = self._base_check
        for end in range(len(plains), 0, -1):
            for count in range(min(REFS, end), 0, -1):
                run = plains[end - count:end]
                check = start
                for part in run:
                    check = zlib.adler32(part, check)
                if check == dict_id:
                    return dictionary(self.base, run)
        return None

    @property
    def size(self) -> int:
        """Bytes held (for the cache's bound)."""
        return sum(len(p) for _, p in self._refs) + 64 * len(self._refs)

    def numbers(self) -> Sequence[int]:
        return [n for n, _ in self._refs]


__all__ = ["CAP", "KEEP", "MAX_PENDING", "REFS", "REF_MAX_BYTES", "DeviceRefs", "ServerRefs",
           "dictionary", "is_reference"]
