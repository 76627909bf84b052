"""The device's recent traffic as dictionary (capability `zd3`, schemas.zdict_recent):
device and server pick the same references by their own rules, so every stream a device
makes is read back exactly when nothing is lost; when things are lost, duplicated or the
server forgets, a stream is read back exactly or refused, never read wrong; both sides
stay bounded; and a lone change shrinks."""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.recent import RecentTraffic
from schemas import zdict, zdict_recent, zdict_schema
from schemas.codes import MALFORMED
from schemas.collection import example_catalog_path, load_catalog
from schemas.errors import ProtocolError
from schemas.payload import inflate
from schemas.zdict_recent import KEEP, MAX_PENDING, REFS, DeviceRefs, ServerRefs

BASE = zdict_schema.dictionary(load_catalog(example_catalog_path()))
_WORDS = ["pending", "done", "route-1", "route-2", "Herengracht", "Amsterdam", "De Vries",
          "leave at the door", "call first", "Bakker", "Utrecht", "Jansen & Zn"]


def _message(n: int, words: list[int], big: bool = False) -> bytes:
    fields = {"status": _WORDS[words[0] % len(_WORDS)],
              "notes": " ".join(_WORDS[w % len(_WORDS)] for w in words),
              "eta": 1764011994860 + n}
    if big:
        fields["blob"] = "x" * (zdict_recent.REF_MAX_BYTES + 10)
    msg = {"type": "changes", "v": 1, "dev": "van-1", "sv": 1, "inc": "aB3dE5gH7jK9mN1p",
           "ch": [{"n": n, "h": f"01a2472a7{n:07x}", "c": "tasks", "k": f"t-{n:07d}",
                   "s": "route-1", "b": 0, "op": "put", "f": fields}]}
    return orjson.dumps(msg)


@dataclass
class _Link:
    """A device and a server with the rules of zdict_recent, and the messages between."""

    device: DeviceRefs = field(default_factory=lambda: DeviceRefs(BASE))
    server: ServerRefs = field(default_factory=lambda: ServerRefs(BASE))
    up: deque[tuple[int, bytes, bytes]] = field(default_factory=deque)
    down: deque[int] = field(default_factory=deque)
    n: int = 0
    used_refs: int = 0
    misses: int = 0

    def send(self, words: list[int], big: bool) -> None:
        self.n += 1
        plain = _message(self.n, words, big)
        dictionary = self.device.dictionary()
        self.used_refs += dictionary is not None
        self.device.sent(self.n, plain)
        stream = zdict.pack(plain, dictionary if dictionary is not None else BASE)
        self.up.append((self.n, plain, stream))

    def deliver(self, *, answer: bool = True) -> bool:
        """The server reads the next message; False: it could not (a miss)."""
        first, plain, stream = self.up.popleft()
        wanted = zdict.wants_dictionary(stream)
        if wanted is None:
            text = stream
        else:
            known = zdict_schema.lookup(wanted)
            found = known if known is not None else self.server.find(wanted)
            if found is None:
                self.misses += 1
                self.device.reset()
                return False
            try:
                text = inflate(stream, 1 << 20, dictionary=found)
            except ProtocolError as exc:  # a colliding id: refused, never read wrong
                assert exc.code == MALFORMED
                self.device.reset()
                return False
        assert text == plain  # read back exactly
        self.server.add(first, text)
        if answer:
            self.down.append(first)
        return True

    def answer(self) -> None:
        self.device.answered([self.down.popleft()])

    def again(self, n: int, words: list[int], big: bool = False) -> None:
        """Message `n` (made of `words`) sent again, as after a transient rejection."""
        plain = _message(n, words, big)
        dictionary = self.device.dictionary()
        self.used_refs += dictionary is not None
        self.device.sent(n, plain)
        self.up.append((n, plain, zdict.pack(plain, dictionary if dictionary is not None
                                              else BASE)))


_STEPS = st.lists(st.tuples(st.sampled_from(["send", "deliver", "answer", "again"]),
                            st.lists(st.integers(0, 50), min_size=1, max_size=6),
                            st.booleans()), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(_STEPS)
def test_in_order_without_loss_every_stream_is_read(steps: list) -> None:
    """Also when an answered message is sent again (a transient rejection: `server_error`,
    `schema_version`, `device_disabled`): same first change, so on both sides the newest
    copy replaces the older reference (PROTOCOL.md §3 "Recent traffic")."""
    link = _Link()
    sent: list[tuple[int, list[int], bool]] = []
    for op, words, big in steps:
        if op == "send":
            link.send(words, big and words[0] % 7 == 0)
            sent.append((link.n, words, big and words[0] % 7 == 0))
        elif op == "deliver" and link.up:
            assert link.deliver()
        elif op == "answer" and link.down:
            link.answer()
        elif op == "again" and sent and not link.up and not link.down:
            link.again(*sent[words[0] % len(sent)])
    while link.up:
        assert link.deliver()
    assert link.misses == 0


def test_a_stream_made_before_the_answer_to_a_message_sent_again_is_read() -> None:
    """An answered message goes again (refused for now); the server reads it and moves
    its copy to the newest place; the device sends its next message before that answer
    arrives. That stream must not name the old order: the device drops the reference
    when it sends the message again (found by CI's Hypothesis run; failed before)."""
    link = _Link()
    for words in ([1, 2], [3, 4]):
        link.send(words, False)
        assert link.deliver()
        link.answer()
    link.again(1, [1, 2])
    assert link.deliver()        # the server moved message 1 to the newest place
    link.send([5, 6], False)     # made before the resend's answer arrived
    assert link.deliver()
    link.answer()
    link.answer()
    link.send([7, 8], False)
    assert link.deliver() and link.misses == 0 and link.used_refs >= 3


def test_a_message_refused_for_now_and_sent_again_is_read_with_the_references() -> None:
    """A change answered with a transient rejection goes again later, the same message
    with the same first change: the server moved its copy to the newest place, so the
    device must too, or its next stream names a run the server does not hold (a
    needless `dictionary_unknown` and resend)."""
    link = _Link()
    for _ in range(3):
        link.send([1, 2], False)
        assert link.deliver()
        link.answer()
    link.again(2, [1, 2])       # change 2 was refused with server_error: sent again
    assert link.deliver()
    link.answer()
    assert list(link.server.numbers()) == [1, 3, 2]
    link.send([4], False)
    assert link.deliver()
    assert link.misses == 0 and link.used_refs == 4


def test_a_quiet_link_uses_the_references_and_shrinks_a_lone_change() -> None:
    link = _Link()
    with_refs = without = 0
    for i in range(40):
        words = [i % 5, (i * 7) % 12, (i * 3) % 11, 4]
        link.send(words, False)
        stream = link.up[-1][2]
        if i >= REFS:
            with_refs += len(stream)
            without += len(zdict.pack(link.up[-1][1], BASE))
        assert link.deliver()
        link.answer()
    assert link.used_refs == 39  # all but the first
    assert with_refs < 0.8 * without


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "deliver", "lose_up", "lose_answer",
                                           "duplicate", "answer", "restart"]),
                          st.lists(st.integers(0, 50), min_size=1, max_size=6)),
                min_size=1, max_size=80))
def test_with_loss_and_restarts_a_stream_is_read_exactly_or_refused(steps: list) -> None:
    link = _Link()
    for op, words in steps:
        if op == "send":
            link.send(words, False)
        elif op == "deliver" and link.up:
            link.deliver()
        elif op == "lose_up" and link.up:
            link.up.popleft()
        elif op == "lose_answer" and link.up:
            link.deliver(answer=False)
        elif op == "duplicate" and link.up:
            link.up.appendleft(link.up[0])
        elif op == "answer" and link.down:
            link.answer()
        elif op == "restart":
            link.server = ServerRefs(BASE)
    # After the losses a refused stream resets the device: the link recovers.
    link.up.clear()
    link.down.clear()
    link.send([1, 2], False)
    if not link.deliver():
        link.send([1, 2], False)
        assert link.deliver()


def test_both_sides_stay_bounded() -> None:
    device, server = DeviceRefs(BASE), ServerRefs(BASE)
    for n in range(1, 500):
        plain = _message(n, [n % 9, 3])
        device.sent(n, plain)
        server.add(n, plain)
        if n % 3 == 0:
            device.answered([n])
    assert len(device._pending) <= MAX_PENDING
    assert device.size <= REFS
    assert len(server.numbers()) == KEEP


def test_a_device_with_many_messages_unanswered_falls_back_to_zd2() -> None:
    device = DeviceRefs(BASE)
    device.sent(1, _message(1, [1]))
    device.answered([1])
    assert device.dictionary() is not None
    for n in range(2, 2 + KEEP - REFS):
        device.sent(n, _message(n, [n]))
    assert device.dictionary() is None  # the server may have dropped the references
    device.answered([2 + KEEP - REFS - 1])  # the latest answer: the earlier ones are lost
    assert device.dictionary() is not None


def test_the_server_cache_is_bounded_in_bytes_and_forgets_least_recent() -> None:
    cache = RecentTraffic(64 * 1024)
    for d in range(200):
        cache.open(f"van-{d}", BASE)
        for n in range(1, 6):
            cache.add(f"van-{d}", n, _message(n, [d, n]))
        assert cache.bytes <= 64 * 1024
    assert cache.tracked("van-199") and not cache.tracked("van-0")
    cache.forget("van-199")
    assert not cache.tracked("van-199")


def test_the_server_cache_does_not_grow_for_devices_it_does_not_track() -> None:
    cache = RecentTraffic(1 << 20)
    cache.add("van-x", 1, _message(1, [1]))
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.find("van-x", zlib.adler32(BASE)) is None


def test_another_base_starts_the_references_anew() -> None:
    cache = RecentTraffic(1 << 20)
    cache.open("van-1", BASE)
    cache.add("van-1", 1, _message(1, [1]))
    ident = zlib.adler32(_message(1, [1]), zlib.adler32(BASE))
    assert cache.find("van-1", ident) is not None
    cache.open("van-1", BASE)  # the same base (a reconnect): kept
    assert cache.find("van-1", ident) is not None
    cache.open("van-1", BASE + b"x")  # a new schema version
    assert cache.find("van-1", ident) is None


@pytest.mark.parametrize("junk", [b"\x78\xbb\x00\x00\x00\x01garbage", b"\x78\xbb\xff\xff"])
def test_a_hostile_stream_naming_no_reference_costs_a_bounded_search(junk: bytes) -> None:
    server = ServerRefs(BASE)
    for n in range(1, 40):
        server.add(n, _message(n, [n]))
    ident = zdict.wants_dictionary(junk)
    assert ident is not None
    assert server.find(ident) is None
