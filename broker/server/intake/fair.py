"""Fair, byte-bounded scheduling of the messages waiting for the merge worker (pure).

    queue = FairQueue(IntakeLimits(max_bytes=64 << 20, device_bytes=4 << 20,
                                   max_payload=262_144))
    queue.offer("up", "van-12", payload)    -> Verdict (QUEUED, REFUSED, DROPPED, FULL)
    queue.offer_control("connected")         the server's own items: always queued, first
    queue.pop()                              -> Item | None, deficit round robin by bytes
    queue.take(max_items, max_bytes, rounds=1)  -> [Item, ...], the same order, at most
                                             one turn of each device

Every device (the device id of the topic a message came on) has its own FIFO queue;
the queues are served by deficit round robin over bytes (Shreedhar & Varghese, 1995):
each turn gives a device `quantum` more bytes of credit and serves its messages while
their cost fits the credit. A device that floods gets the same share of the worker as
one that sends a message a minute, and one device's messages are never reordered.

Bounds, checked on every offer (what each verdict means for the caller):

    payload > max_payload       REFUSED: the payload is not queued; a small note (its
                                first REFUSED_HEAD bytes and its size) takes its place,
                                so the engine can answer `too_large` and keep a dead letter
    device over device_bytes    DROPPED: counted and forgotten; the device resends what
                                the server does not ack (PROTOCOL.md §1, §9.2)
    all devices over max_bytes  FULL: nothing queued; the caller waits for the worker to
                                take something and offers again (backpressure)

A message's cost is its payload, its device id and `ITEM_OVERHEAD` (the Python objects
around it), so `queued_bytes` is an honest measure of the memory held and even empty
payloads cost something. Control items (the server's own: "connected") are few,
coalesced (one of each kind waits at most) and served before any device.

Replayed statuses (`retained` statuses: the broker's replay when the server subscribes)
are served next, in their order of arrival, before any device's turn. They rebuild
presence after "connected" forgot it, and a change must not be merged before the
statuses that arrived ahead of it: round robin would serve a device whose hello and
changes followed its own replayed status before another device's status that arrived
earlier, and that device, believed offline, would miss the change's delta although it
stayed online throughout (it only catches up at its next reconnect or gap). There is one
retained status per device and the broker sends them only on subscribe, so no device
can use this to jump the queue. A replayed status supersedes that device's statuses
still queued (they are older: the broker's retained message is its latest), which are
dropped rather than applied after it.

No threads and no I/O here: `broker.server.intake.bounded` wraps this for the MQTT
network thread (producer) and the merge worker (consumer).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

ITEM_OVERHEAD = 256
"""Bytes counted per queued message on top of its payload and device id."""

REFUSED_HEAD = 4096
"""Bytes of an oversized payload kept in its refusal note (for the dead letter); at most
max_payload."""

DEFAULT_QUANTUM = 16 * 1024
"""Credit per device per round: small enough that a flood of tiny messages from one
device interleaves finely with the others within one group of the worker."""


class Verdict(enum.Enum):
    """What `FairQueue.offer` did with a message."""

    QUEUED = "queued"
    REFUSED = "refused"
    """Over max_payload: a refusal note was queued instead of the payload."""
    DROPPED = "dropped"
    """The device is over its quota (or the note would not fit): nothing queued."""
    FULL = "full"
    """The global bound is reached: nothing queued, offer again once there is room."""
    CLOSED = "closed"
    """(Only from the thread-safe wrapper) the intake is shut down."""


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    """The bounds of the intake (see the module docstring)."""

    max_bytes: int
    device_bytes: int
    max_payload: int
    quantum: int = DEFAULT_QUANTUM

    def __post_init__(self) -> None:
        if self.max_payload < 1 or self.quantum < 1:
            raise ValueError("max_payload and quantum must be positive")
        if self.device_bytes > self.max_bytes:
            raise ValueError(f"device_bytes ({self.device_bytes}) exceeds max_bytes "
                             f"({self.max_bytes})")
        if self.device_bytes < self.max_payload + ITEM_OVERHEAD:
            raise ValueError(f"device_bytes ({self.device_bytes}) cannot hold one message "
                             f"of max_payload ({self.max_payload}) bytes")


@dataclass(frozen=True, slots=True)
class Item:
    """One queued message (or refusal note, or control item)."""

    kind: str
    """``up`` or ``status`` (the topic it came on), or a control kind."""
    device: str
    payload: bytes
    """The payload; for a refusal note only its first REFUSED_HEAD bytes."""
    size: int
    """The payload's size as received."""
    refused: bool = False
    """A refusal note: the payload was over max_payload and is not here."""
    control: bool = False
    origin: int = 0
    """For a refusal note: `id()` of the payload it stands for, so a transport that
    tracks deliveries by payload (`AmqpLink.settle`) can still settle it."""
    retained: bool = False
    """A retained message the broker sent on subscribe (old news), not a live one."""
    at: int = 0
    """When it arrived (ms since the epoch, on the network thread; 0: not noted)."""

    @property
    def cost(self) -> int:
        """Bytes this item holds, as the bounds count them."""
        return len(self.payload) + len(self.device) + ITEM_OVERHEAD


@dataclass(slots=True)
class _Flow:
    items: deque[Item] = field(default_factory=deque)
    bytes: int = 0
    deficit: int = 0
    in_turn: bool = False


@dataclass(slots=True)
class IntakeCounters:
    """Cumulative counts since the queue was made (all in messages or bytes)."""

    queued: int = 0
    queued_bytes: int = 0
    refused: int = 0
    refused_bytes: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    full: int = 0
    """Offers answered FULL (each one a wait of the network thread)."""


class FairQueue:
    """Per-device FIFO queues served by deficit round robin (see the module docstring)."""

    def __init__(self, limits: IntakeLimits) -> None:
        self.limits = limits
        self._flows: dict[str, _Flow] = {}
        self._ring: deque[str] = deque()  # devices with queued items, in serving order
        self._control: deque[Item] = deque()
        self._replay: deque[Item] = deque()
        """Replayed statuses, served after control items and before devices (docstring)."""
        self._bytes = 0
        self._items = 0
        self.peak_bytes = 0
        self.counters = IntakeCounters()
        self.turns = 0
        """Device turns ended so far (a device's turn ends when its credit is spent)."""

    # --- sizes

    @property
    def queued_bytes(self) -> int:
        """Bytes held by device messages (the bounded quantity)."""
        return self._bytes

    def __len__(self) -> int:
        return self._items + len(self._control)

    def device_bytes(self, device: str) -> int:
        flow = self._flows.get(device)
        return 0 if flow is None else flow.bytes

    def devices(self) -> int:
        """Devices with messages waiting."""
        return len(self._ring)

    # --- producing

    def offer(self, kind: str, device: str, payload: bytes, *, retained: bool = False,
              at: int = 0) -> Verdict:
        """Queue a device's message, or say why not (see `Verdict`); `retained` and
        `at` go with it (`Item`)."""
        limits = self.limits
        refused = len(payload) > limits.max_payload
        if refused:
            # (never more than a message may hold: a note costs no more than one)
            head = payload[:min(REFUSED_HEAD, limits.max_payload)]
            item = Item(kind, device, head, len(payload), refused=True, origin=id(payload),
                        retained=retained, at=at)
        else:
            item = Item(kind, device, payload, len(payload), retained=retained, at=at)
        cost = item.cost
        if replayed(item):
            return self._offer_replay(item)
        flow = self._flows.get(device)
        held = 0 if flow is None else flow.bytes
        c = self.counters
        if held + cost > limits.device_bytes:
            c.dropped += 1
            c.dropped_bytes += len(payload)
            return Verdict.DROPPED
        if self._bytes + cost > limits.max_bytes:
            c.full += 1
            return Verdict.FULL
        if flow is None:
            flow = self._flows[device] = _Flow()
            self._ring.append(device)
        flow.items.append(item)
        flow.bytes += cost
        self._bytes += cost
        self._items += 1
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        if refused:
            c.refused += 1
            c.refused_bytes += len(payload)
            return Verdict.REFUSED
        c.queued += 1
        c.queued_bytes += len(payload)
        return Verdict.QUEUED

    def _offer_replay(self, item: Item) -> Verdict:
        """Queue a replayed status (module docstring); only the global bound applies:
        the broker sends one per device, on the server's subscribe."""
        c = self.counters
        if self._bytes + item.cost > self.limits.max_bytes:
            c.full += 1
            return Verdict.FULL
        self._drop_statuses(item.device)
        self._replay.append(item)
        self._bytes += item.cost
        self._items += 1
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        if item.refused:
            c.refused += 1
            c.refused_bytes += item.size
            return Verdict.REFUSED
        c.queued += 1
        c.queued_bytes += item.size
        return Verdict.QUEUED

    def _drop_statuses(self, device: str) -> None:
        """Forget `device`'s queued statuses: a replayed one supersedes them."""
        flow = self._flows.get(device)
        if flow is None or not any(i.kind == "status" for i in flow.items):
            return
        stale = [i for i in flow.items if i.kind == "status"]
        flow.items = deque(i for i in flow.items if i.kind != "status")
        freed = sum(i.cost for i in stale)
        flow.bytes -= freed
        self._bytes -= freed
        self._items -= len(stale)
        if not flow.items:
            # (never inside `take`: offers and takes do not interleave)
            self._ring.remove(device)
            del self._flows[device]

    def offer_control(self, kind: str) -> bool:
        """Queue one of the server's own items; False if one of this kind already waits."""
        if any(item.kind == kind for item in self._control):
            return False
        self._control.append(Item(kind, "", b"", 0, control=True))
        return True

    # --- consuming

    def pop(self) -> Item | None:
        """The next item: control items first, then replayed statuses, then devices by
        deficit round robin."""
        return self._pop(None)

    def _pop(self, turn_limit: int | None) -> Item | None:
        """`pop`, but None rather than begin a turn once `turns` reached `turn_limit`."""
        if self._control:
            return self._control.popleft()
        if self._replay:
            item = self._replay.popleft()
            self._bytes -= item.cost
            self._items -= 1
            return item
        ring = self._ring
        quantum = self.limits.quantum
        idle_turns = 0
        while ring:
            device = ring[0]
            flow = self._flows[device]
            head = flow.items[0]
            cost = head.cost
            if not flow.in_turn:
                if turn_limit is not None and self.turns >= turn_limit:
                    return None
                flow.in_turn = True
                flow.deficit += quantum
            if cost <= flow.deficit:
                flow.deficit -= cost
                flow.items.popleft()
                flow.bytes -= cost
                self._bytes -= cost
                self._items -= 1
                if not flow.items:
                    # An idle device keeps no credit (DRR): it cannot save up for a burst.
                    ring.popleft()
                    del self._flows[device]
                    self.turns += 1
                elif flow.items[0].cost > flow.deficit:
                    # Its turn ends now, not at the next pop: `take` counts turns exactly.
                    flow.in_turn = False
                    ring.rotate(-1)
                    self.turns += 1
                return head
            flow.in_turn = False
            ring.rotate(-1)
            self.turns += 1
            idle_turns += 1
            if idle_turns >= len(ring):
                # A whole round served nothing (every head is bigger than its credit):
                # grant the empty rounds still needed before one fits, all at once.
                self._skip_rounds()
                idle_turns = 0
        return None

    def _skip_rounds(self) -> None:
        quantum = self.limits.quantum
        flows = [self._flows[device] for device in self._ring]
        rounds = min(-(-(f.items[0].cost - f.deficit) // quantum) for f in flows) - 1
        if rounds > 0:
            for f in flows:
                f.deficit += rounds * quantum

    def take(self, max_items: int, max_bytes: int, *, rounds: int | None = None
             ) -> list[Item]:
        """Up to `max_items` items, stopping once their payloads reach `max_bytes`, and
        with `rounds`, once that many rounds of turns were served (a round: one turn of
        every device waiting when it began). One round per group keeps a flooding
        device to one quantum per group, so the group that carries another device's
        message is small and its answer comes soon."""
        out: list[Item] = []
        size = 0
        limit: int | None = None
        while len(out) < max_items and size < max_bytes:
            item = self._pop(limit)
            if item is None:
                break
            out.append(item)
            size += len(item.payload)
            if (rounds is not None and limit is None and not item.control
                    and not replayed(item)):
                # The rounds count from the first device served (whatever empty rounds
                # it took to reach it): its turn, then every other device's.
                flow = self._flows.get(item.device)
                mid_turn = flow is not None and flow.in_turn
                others = len(self._ring) - (1 if flow is not None else 0)
                limit = self.turns + (1 if mid_turn else 0) + others + (
                    (rounds - 1) * len(self._ring))
        return out

    def __iter__(self) -> Iterator[Item]:
        """Drain everything, in serving order."""
        while (item := self.pop()) is not None:
            yield item


def replayed(item: Item) -> bool:
    """A status the broker replayed on subscribe (served ahead of devices)."""
    return item.retained and item.kind == "status" and not item.control


__all__ = [
    "DEFAULT_QUANTUM",
    "ITEM_OVERHEAD",
    "REFUSED_HEAD",
    "FairQueue",
    "IntakeCounters",
    "IntakeLimits",
    "Item",
    "Verdict",
]
