"""The server's intake (broker/server/intake): bounds, fairness, order, backpressure."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.intake import (
    ITEM_OVERHEAD,
    REFUSED_HEAD,
    FairQueue,
    Intake,
    IntakeLimits,
    Item,
    Verdict,
)
from tests.helpers import wait_until

LIMITS = IntakeLimits(max_bytes=12_000, device_bytes=4_000, max_payload=1_000, quantum=300)
DEVICES = ["van-1", "van-2", "van-3", "a-much-longer-device-id-4"]
MAX_COST = LIMITS.max_payload + max(len(d) for d in DEVICES) + ITEM_OVERHEAD
SETTINGS = settings(max_examples=300, deadline=None)


@dataclass(frozen=True)
class Offer:
    device: str
    size: int
    kind: str = "up"


@dataclass(frozen=True)
class Pop:
    count: int


offers = st.builds(Offer, st.sampled_from(DEVICES),
                   st.one_of(st.integers(0, 200), st.integers(0, 1_000),
                             st.integers(1_001, 3_000)),
                   st.sampled_from(["up", "up", "status"]))
ops = st.lists(st.one_of(offers, offers, st.builds(Pop, st.integers(1, 8))), max_size=250)


def payload(tag: int, size: int) -> bytes:
    """A payload of `size` bytes that names its offer (its first 8 bytes)."""
    head = tag.to_bytes(8, "big")
    return (head + b"x" * size)[:size] if size >= 8 else head[:size]


@given(ops)
@SETTINGS
def test_bounds_order_and_conservation(script: list[Offer | Pop]) -> None:
    """Whatever is offered: bytes held never pass the global or a device's bound, a
    device's messages come out in the order they went in, an oversized payload is only
    ever a note, and every offer is served, dropped, refused-as-full or still queued."""
    q = FairQueue(LIMITS)
    accepted: dict[str, list[int]] = defaultdict(list)
    served: dict[str, list[int]] = defaultdict(list)
    verdicts: list[Verdict] = []
    sizes: dict[int, int] = {}
    for tag, op in enumerate(script):
        if isinstance(op, Offer):
            data = payload(tag, op.size) if op.size >= 8 else tag.to_bytes(8, "big")
            sizes[tag] = len(data)
            verdict = q.offer(op.kind, op.device, data)
            verdicts.append(verdict)
            if verdict in (Verdict.QUEUED, Verdict.REFUSED):
                accepted[op.device].append(tag)
            assert (verdict is Verdict.REFUSED) == (len(data) > LIMITS.max_payload)\
                or verdict in (Verdict.DROPPED, Verdict.FULL)
        else:
            for item in q.take(op.count, 1 << 30):
                tag = int.from_bytes(item.payload[:8], "big")
                served[item.device].append(tag)
                assert item.size == sizes[tag]
                if item.refused:
                    assert item.size > LIMITS.max_payload
                    assert len(item.payload) == min(REFUSED_HEAD, LIMITS.max_payload)
                else:
                    assert len(item.payload) == item.size <= LIMITS.max_payload
        assert q.queued_bytes <= LIMITS.max_bytes
        assert all(q.device_bytes(d) <= LIMITS.device_bytes for d in DEVICES)
    rest = list(q)
    for item in rest:
        served[item.device].append(int.from_bytes(item.payload[:8], "big"))
    assert dict(served) == {d: tags for d, tags in accepted.items() if tags}
    c = q.counters
    offered = sum(1 for op in script if isinstance(op, Offer))
    assert c.queued + c.refused + c.dropped + c.full == offered == len(verdicts)
    assert q.queued_bytes == 0 and len(q) == 0


@given(st.lists(st.tuples(st.sampled_from(DEVICES), st.integers(0, 1_000)),
                min_size=1, max_size=300))
@SETTINGS
def test_backlogged_devices_get_equal_bytes(backlog: list[tuple[str, int]]) -> None:
    """Deficit round robin: while two devices both have messages waiting, the bytes
    served to each never differ by more than one quantum plus one message, whatever
    their message sizes (a flood of small or of large messages gains nothing)."""
    q = FairQueue(IntakeLimits(max_bytes=1 << 30, device_bytes=1 << 28, max_payload=1_000,
                               quantum=300))
    remaining: dict[str, int] = defaultdict(int)
    for device, size in backlog:
        assert q.offer("up", device, b"p" * size) is Verdict.QUEUED
        remaining[device] += 1
    sent: dict[str, int] = defaultdict(int)
    for item in q:
        sent[item.device] += item.cost
        remaining[item.device] -= 1
        busy = [d for d, left in remaining.items() if left > 0]
        for a in busy:
            for b in busy:
                assert sent[a] - sent[b] <= 300 + MAX_COST, (a, b, dict(sent))


@given(ops)
@SETTINGS
def test_no_device_waits_behind_a_flood(script: list[Offer | Pop]) -> None:
    """A message waits for at most a bounded number of bytes of other devices' messages:
    (devices - 1) x (rounds its own queue needs + 1) x (quantum + one message)."""
    q = FairQueue(LIMITS)
    waiting: dict[int, tuple[int, int]] = {}  # tag -> (others' bytes at enqueue, budget)
    others_served: dict[str, int] = defaultdict(int)
    total = 0
    for tag, op in enumerate(script):
        if isinstance(op, Offer):
            size = max(op.size, 8)
            if q.offer(op.kind, op.device, payload(tag, size)) in (Verdict.QUEUED,
                                                                   Verdict.REFUSED):
                ahead = q.device_bytes(op.device)
                rounds = -(-ahead // LIMITS.quantum) + 1
                budget = (len(DEVICES) - 1) * rounds * (LIMITS.quantum + MAX_COST)
                waiting[tag] = (total - others_served[op.device], budget)
            continue
        for item in q.take(op.count, 1 << 30):
            tag = int.from_bytes(item.payload[:8], "big")
            before, budget = waiting.pop(tag)
            waited = (total - others_served[item.device]) - before
            assert waited <= budget, (item.device, waited, budget)
            total += item.cost
            others_served[item.device] += item.cost


@given(ops)
@SETTINGS
def test_one_round_per_take_caps_each_device(script: list[Offer | Pop]) -> None:
    """A take of one round holds one turn per device: its items are contiguous and cost
    at most one quantum plus one message, so a flooding device cannot fill a group."""
    q = FairQueue(LIMITS)
    for tag, op in enumerate(script):
        if isinstance(op, Offer):
            q.offer(op.kind, op.device, payload(tag, max(op.size, 8)))
            continue
        group = q.take(1000, 1 << 30, rounds=1)
        assert group or len(q) == 0
        runs = [d for i, d in enumerate(item.device for item in group)
                if i == 0 or group[i - 1].device != d]
        assert len(runs) == len(set(runs)), runs
        for device in set(runs):
            cost = sum(i.cost for i in group if i.device == device)
            assert cost <= 2 * LIMITS.quantum + MAX_COST


def test_one_round_of_large_messages_is_one_group() -> None:
    """Devices whose messages each need several quanta of credit still share one group
    (group commit), one message each."""
    q = FairQueue(IntakeLimits(max_bytes=1 << 20, device_bytes=1 << 19, max_payload=1_000,
                               quantum=300))
    for device in DEVICES:
        for _ in range(3):
            assert q.offer("up", device, b"x" * 1_000) is Verdict.QUEUED
    for _ in range(3):
        group = q.take(1000, 1 << 30, rounds=1)
        assert sorted(item.device for item in group) == sorted(DEVICES)


def test_control_items_go_first_and_are_coalesced() -> None:
    """The server's own items are served before any device's, one of a kind at most."""
    q = FairQueue(LIMITS)
    for i in range(5):
        q.offer("up", "van-1", b"x" * 900)
        q.offer("status", "van-2", b"s" * i)
    assert q.offer_control("connected") is True
    assert q.offer_control("connected") is False
    first = q.pop()
    assert first is not None and first.control and first.kind == "connected"
    assert all(not item.control for item in q)


def test_flooding_device_is_dropped_not_the_others() -> None:
    """Past its quota a device's messages are dropped and counted; another device's
    messages are still queued, and the global bound is never what stops them."""
    q = FairQueue(LIMITS)
    verdicts = [q.offer("up", "van-1", b"x" * 900) for _ in range(50)]
    assert verdicts[:3] == [Verdict.QUEUED] * 3 and set(verdicts[3:]) == {Verdict.DROPPED}
    assert q.counters.dropped == 47 and q.counters.dropped_bytes == 47 * 900
    assert q.offer("up", "van-2", b"y" * 900) is Verdict.QUEUED
    assert [item.device for item in q.take(2, 1 << 30)] == ["van-1", "van-2"]


def test_oversized_payload_becomes_a_small_note() -> None:
    """A payload over max_payload is refused at once: only a head and its size wait."""
    q = FairQueue(IntakeLimits(max_bytes=1 << 20, device_bytes=1 << 19, max_payload=10_000))
    huge = b"{" + b"z" * 5_000_000
    assert q.offer("up", "van-1", huge) is Verdict.REFUSED
    assert q.queued_bytes < REFUSED_HEAD + 1_000
    item = q.pop()
    assert isinstance(item, Item) and item.refused and item.size == len(huge)
    assert item.payload == huge[:REFUSED_HEAD]


def test_global_bound_says_full_then_room_after_a_pop() -> None:
    """With every device under its quota, the global bound answers FULL (backpressure)
    until the worker takes something."""
    q = FairQueue(IntakeLimits(max_bytes=3_000, device_bytes=2_000, max_payload=1_000))
    assert q.offer("up", "van-1", b"a" * 1_000) is Verdict.QUEUED
    assert q.offer("up", "van-2", b"b" * 1_000) is Verdict.QUEUED
    assert q.offer("up", "van-3", b"c" * 1_000) is Verdict.FULL
    assert q.pop() is not None
    assert q.offer("up", "van-3", b"c" * 1_000) is Verdict.QUEUED


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"max_bytes": 1_000, "device_bytes": 2_000, "max_payload": 500}, "exceeds max_bytes"),
    ({"max_bytes": 10_000, "device_bytes": 1_000, "max_payload": 1_000}, "cannot hold"),
    ({"max_bytes": 10_000, "device_bytes": 5_000, "max_payload": 0}, "positive"),
])
def test_limits_that_could_never_admit_a_message_are_refused(kwargs: dict[str, int],
                                                             needle: str) -> None:
    """Limits under which a legal message could never be queued are a ValueError."""
    with pytest.raises(ValueError, match=needle):
        IntakeLimits(**kwargs)


# ---------------------------------------------------------------- the thread-safe wrapper


def test_put_waits_for_room_and_resumes_after_take() -> None:
    """A full intake holds the producer (backpressure) until the worker takes."""
    intake = Intake(IntakeLimits(max_bytes=3_000, device_bytes=2_000, max_payload=1_000))
    assert intake.put("up", "van-1", b"a" * 1_000) is Verdict.QUEUED
    assert intake.put("up", "van-2", b"b" * 1_000) is Verdict.QUEUED
    result: list[Verdict] = []
    producer = threading.Thread(target=lambda: result.append(
        intake.put("up", "van-3", b"c" * 1_000)))
    producer.start()
    wait_until(lambda: intake.stats().waits == 1, 10, message="the producer waiting")
    assert result == [] and intake.stats().items == 2
    taken = intake.take(1.0, max_items=1, max_bytes=1 << 20)
    assert taken is not None and len(taken) == 1
    producer.join(10)
    assert result == [Verdict.QUEUED]
    assert intake.stats().peak_bytes <= 3_000


def test_close_releases_a_waiting_producer_and_the_worker() -> None:
    """close() wakes a producer waiting for room (CLOSED); take hands out what was
    queued, then says None."""
    intake = Intake(IntakeLimits(max_bytes=2_000, device_bytes=2_000, max_payload=1_000))
    assert intake.put("up", "van-1", b"a" * 1_000) is Verdict.QUEUED
    result: list[Verdict] = []
    producer = threading.Thread(target=lambda: result.append(
        intake.put("up", "van-2", b"b" * 1_000)))
    producer.start()
    wait_until(lambda: intake.stats().waits == 1, 10, message="the producer waiting")
    intake.close()
    producer.join(10)
    assert result == [Verdict.CLOSED]
    rest = intake.take(5.0, max_items=10, max_bytes=1 << 20)
    assert rest is not None and [i.device for i in rest] == ["van-1"]
    assert intake.take(5.0, max_items=10, max_bytes=1 << 20) is None
    assert intake.put("up", "van-1", b"x") is Verdict.CLOSED


def test_take_times_out_empty_and_groups_by_bytes() -> None:
    """take() returns [] after its timeout with nothing queued, and stops a group once
    its payloads reach max_bytes."""
    intake = Intake(IntakeLimits(max_bytes=1 << 20, device_bytes=1 << 19, max_payload=1_000))
    assert intake.take(0.05, max_items=10, max_bytes=100) == []
    for i in range(10):
        intake.put("up", f"van-{i}", b"x" * 60)
    group = intake.take(0.05, max_items=100, max_bytes=100)
    assert group is not None and len(group) == 2
    intake.put_control("connected")
    first = intake.take(0.05, max_items=1, max_bytes=100)
    assert first is not None and first[0].control
