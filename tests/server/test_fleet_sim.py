"""Three real device agents (in process, no broker) editing offline, then converging.

The "network" between them and the engine is lossy and duplicating in both directions,
and reorders what goes up: up messages (changes, hellos, catch-up requests) are dropped
at random and each group reaches the engine shuffled; down messages are dropped or
delivered twice at random but keep their order (one publisher to one subscriber over
QoS 1, as MQTT 3.1.1 §4.6 orders them; a resend after a reconnect is a duplicate, which
the duplicates cover); devices resend what is not acked, as they would over a real
broker. When the
fleet is online and quiet, every device's view of every record equals the server's
(DESIGN.md guarantee 2), every counter equals the sum of the increments made on all
devices minus those refused for good (guarantee 1), and every concurrent loser is in the
conflict log (guarantee 3).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import Agent
from broker.server.engine import Engine
from broker.server.operations import purge_tombstones
from broker.server.registry import issue_command
from broker.server.store.base import Store
from schemas import codec, wire
from tests.server.conftest import StoreFactory
from tests.server.helpers import CATALOG, FakeTime, make_engine, status
from waystation import merge
from waystation.config import AgentConfig

DEVS = ("van-1", "van-2", "van-3")
SCOPES = ("r1", "d1")


class Fleet:
    """Agents wired to the engine through an unreliable in-process network."""

    def __init__(self, engine: Engine, agents: dict[str, Agent], rng: random.Random,
                 loss: float = 0.0, dup: float = 0.0, up_loss: float = 0.0) -> None:
        self.engine, self.agents, self.rng = engine, agents, rng
        self.loss, self.dup, self.up_loss = loss, dup, up_loss
        self.up_dropped = 0
        self.reordered = 0
        self.online: set[str] = set()
        self.queue: list[tuple[str, bytes]] = []
        self.req = 0

    def up(self, dev: str, msg: wire.Message) -> None:
        self.queue.append((dev, codec.encode(msg, compress_over=512)))

    def connect(self, dev: str) -> None:
        self.online.add(dev)
        self.engine.handle_status(dev, status(dev, True))
        sync = self.agents[dev].sync
        self.up(dev, sync.hello("test/1"))
        self.catchup(dev)

    def disconnect(self, dev: str) -> None:
        self.online.discard(dev)
        self.engine.handle_status(dev, status(dev, False))

    def catchup(self, dev: str) -> None:
        self.req += 1
        self.up(dev, self.agents[dev].sync.catchup_request(f"c{self.req}"))

    def send_pending(self, dev: str) -> None:
        batch = self.agents[dev].sync.next_batch(max_changes=7)
        if batch:
            self.up(dev, batch.message(dev))

    def flush(self) -> int:
        """Deliver queued up messages as one group; route the answers. Returns #down."""
        group, self.queue = self.queue, []
        kept = [m for m in group if self.rng.random() >= self.up_loss]
        self.up_dropped += len(group) - len(kept)
        self.rng.shuffle(kept)   # the engine sees a group in any order, even one device's
        self.reordered += kept != [m for m in group if m in kept]
        group = kept
        delivered = 0
        for dev, payload in self.engine.handle_many(group):
            if dev not in self.online or self.rng.random() < self.loss:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                self.deliver(dev, payload)
                delivered += 1
        return delivered

    def deliver(self, dev: str, payload: bytes) -> None:
        msg = codec.decode(payload, allowed=wire.DOWN_TYPES, max_payload=1 << 20)
        sync = self.agents[dev].sync
        if isinstance(msg, wire.Ack):
            sync.apply_ack(msg)
        elif isinstance(msg, wire.Reject):
            sync.apply_reject(msg)
        elif isinstance(msg, wire.Delta):
            sync.apply_delta(msg)
        elif isinstance(msg, wire.Page):
            sync.apply_page(msg)
            if msg.more:
                self.catchup(dev)
        elif isinstance(msg, wire.Checkpoint):
            sync.apply_checkpoint(msg)
        elif isinstance(msg, wire.Command):  # pragma: no cover - no commands issued here
            if msg.cmd == "wipe":
                self.agents[dev].wipe(msg.id)
            else:
                sync.execute_command(msg)

    def settle(self, rounds: int = 60) -> None:
        """Resend and catch up until nothing is pending and a last catch-up is quiet."""
        for _ in range(rounds):
            for dev in sorted(self.online):
                self.send_pending(dev)
            self.flush()
            if not any(self.agents[d].sync.pending_count() for d in self.online):
                break
        saved = self.loss, self.dup, self.up_loss
        self.loss = self.dup = self.up_loss = 0.0
        for dev in sorted(self.online):
            self.catchup(dev)
        while self.queue:
            self.flush()
        self.loss, self.dup, self.up_loss = saved


def _server_records(store: Store) -> dict[tuple[str, str], merge.RecordState]:
    out = {}
    with store.read() as txn:
        for scope in SCOPES:
            for _, c, k in txn.index_range(scope, 0, 100_000):
                raw = txn.get_record(c, k)
                assert raw is not None
                out[(c, k)] = merge.from_json(raw)
    return out


def _visible(fields: dict[str, object]) -> dict[str, object]:
    """A device's fields without emptied sets: a part state lists a set that lost its
    last member as [] (merge.to_rec), a whole state leaves it out; both mean no members."""
    return {name: value for name, value in fields.items() if value != []}


@pytest.fixture
def fleet(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Fleet, Store]]:
    """Three agents and an engine over a fresh store of each backend."""
    time = FakeTime()
    engine, store, _ = make_engine(tmp_path / "server", {d: SCOPES for d in DEVS}, time=time,
                                   store=store_factory())
    agents = {}
    for dev in DEVS:
        cfg = AgentConfig.model_validate({"device_id": dev, "data_dir": tmp_path / dev,
                                          "scopes": list(SCOPES)})
        agents[dev] = Agent.open(cfg, CATALOG, now_ms=time)
    yield Fleet(engine, agents, random.Random(11), loss=0.3, dup=0.2, up_loss=0.25), store
    for ag in agents.values():
        ag.close()
    store.close()


Issued = dict[tuple[str, str, str], int]
"""(collection, key, counter field) -> sum of every increment the devices made."""


def _edit_offline(ag: Agent, rng: random.Random, dev: str, time: FakeTime,
                  issued: Issued) -> None:
    for i in range(40):
        time.now += rng.randrange(1, 50)
        key = f"t{rng.randrange(5)}"
        action = rng.randrange(6)
        current = ag.get("tasks", key)
        if action == 0 or current is None:
            ag.put("tasks", key, {"route": "r1", "status": f"{dev}-{i}"})
        elif action == 1:
            amount = rng.randrange(1, 4)
            ag.increment("tasks", key, "attempts", amount)
            slot = ("tasks", key, "attempts")
            issued[slot] = issued.get(slot, 0) + amount
        elif action == 2:
            ag.add("tasks", key, "labels", [rng.choice("abcd")])
        elif action == 3:
            labels = current.fields.get("labels") or []
            if labels:
                ag.remove("tasks", key, "labels", [rng.choice(labels)])
        elif action == 4:
            ag.put("tasks", key, {"address": f"{dev} dock {i}"})
        else:
            amount = rng.choice([5, -1, -2])
            ag.increment("inventory", "sku-1", "stock", amount)
            issued[("inventory", "sku-1", "stock")] = \
                issued.get(("inventory", "sku-1", "stock"), 0) + amount


def _refused(agents: dict[str, Agent]) -> Issued:
    """The increments the server refused for good (dead letters on the devices)."""
    out: Issued = {}
    for ag in agents.values():
        for dead in ag.dead_letters():
            ch = dead.change
            for field, amount in (ch.get("i") or {}).items():
                slot = (ch["c"], ch["k"], field)
                out[slot] = out.get(slot, 0) + amount
    return out


@pytest.mark.parametrize("seed", [3, 5, 8, 13])
def test_three_devices_converge_after_concurrent_offline_edits(
        fleet: tuple[Fleet, Store], seed: int) -> None:
    """Offline edits on 3 devices, lossy and duplicating links: all views end equal."""
    net, store = fleet
    rng = random.Random(seed)
    net.rng = random.Random(seed + 100)
    time: FakeTime = net.engine.now_ms  # type: ignore[assignment]
    for dev in DEVS:
        net.connect(dev)
    net.agents["van-1"].put("inventory", "sku-1", {"depot": "d1", "name": "bolts"})
    net.agents["van-1"].increment("inventory", "sku-1", "stock", 20)
    net.settle()
    for dev in DEVS:
        net.disconnect(dev)
    issued: Issued = {("inventory", "sku-1", "stock"): 20}
    for dev in DEVS:
        _edit_offline(net.agents[dev], rng, dev, time, issued)
    for dev in ("van-3", "van-1", "van-2"):  # reconnect one by one
        net.connect(dev)
        net.settle(rounds=5)
    net.settle()

    server = _server_records(store)
    assert server, "nothing reached the server"
    for dev, ag in net.agents.items():
        assert ag.sync.pending_count() == 0, dev
        for (c, k), rec in server.items():
            view = ag.get(c, k, include_deleted=True)
            assert view is not None, (dev, c, k)
            assert _visible(view.fields) == rec.values(), (dev, c, k)
            assert view.deleted == rec.deleted
            assert view.version == rec.q
    # counters: every total equals the sum of the increments made on all devices minus
    # those refused for good; none lost to the dropped messages, none doubled by resends
    with store.read() as txn:
        seqs = txn.scope_seqs()
    assert seqs["r1"] > 0 and seqs["d1"] > 0
    refused = _refused(net.agents)
    assert set(refused) <= {("inventory", "sku-1", "stock")}, refused  # only the stock rule
    for (c, k, field), total in issued.items():
        expected = total - refused.get((c, k, field), 0)
        assert server[(c, k)].value(field) == expected, (c, k, field, issued, refused)
    stock = server[("inventory", "sku-1")].value("stock")
    assert stock is not None and stock >= 0
    # concurrent writes left their losers in the conflict log
    with store.read() as txn:
        logged = txn.conflicts(open_only=False, limit=10_000)
    assert any(r.entry["kind"] == "lww" for r in logged)
    assert any(r.entry["kind"] == "manual" for r in logged)
    # the lossy links really made devices resend: duplicates were acked, not re-applied;
    # up messages really were lost and groups really reordered
    assert net.engine.counters["duplicates"] > 0
    assert net.up_dropped > 0 and net.reordered > 0


def test_rejected_offline_write_rolls_back_on_the_device(
        fleet: tuple[Fleet, Store]) -> None:
    """A write the server refuses (stock below 0) is dead-lettered on the device and undone."""
    net, store = fleet
    for dev in DEVS:
        net.connect(dev)
    net.agents["van-1"].put("inventory", "sku-9", {"depot": "d1"})
    net.agents["van-1"].increment("inventory", "sku-9", "stock", 3)
    net.settle()
    net.disconnect("van-2")
    net.disconnect("van-3")
    net.agents["van-2"].increment("inventory", "sku-9", "stock", -3)
    net.agents["van-3"].increment("inventory", "sku-9", "stock", -2)
    net.connect("van-2")
    net.settle()
    net.connect("van-3")
    net.settle()
    assert [d.code for d in net.agents["van-3"].dead_letters()] == ["rule_rejected"]
    assert _refused(net.agents) == {("inventory", "sku-9", "stock"): -2}   # 3 - 3 - 2 + 2
    for ag in net.agents.values():
        rec = ag.get("inventory", "sku-9")
        assert rec is not None and rec.fields["stock"] == 0
    with store.read() as txn:
        assert any(d.code == "rule_rejected" for d in txn.dead_letters(10))


def test_snapshot_after_purge_drops_what_was_deleted(fleet: tuple[Fleet, Store]) -> None:
    """A device that slept through a delete whose tombstone was purged resyncs by snapshot."""
    net, store = fleet
    for dev in DEVS:
        net.connect(dev)
    for key in ("a", "b", "c"):
        net.agents["van-1"].put("tasks", key, {"route": "r1", "status": "new"})
    net.settle()
    net.disconnect("van-2")
    net.agents["van-1"].delete("tasks", "b")
    net.agents["van-1"].put("tasks", "c", {"status": "done"})
    net.settle()
    time: FakeTime = net.engine.now_ms  # type: ignore[assignment]
    assert purge_tombstones(store, time(), retention_ms=0) == 1
    assert net.agents["van-2"].get("tasks", "b") is not None  # still there, unaware
    net.connect("van-2")
    net.settle()
    ag = net.agents["van-2"]
    assert ag.get("tasks", "b", include_deleted=True) is None
    assert ag.get("tasks", "c").fields["status"] == "done"  # type: ignore[union-attr]
    assert sorted(r.key for r in ag.list("tasks")) == ["a", "c"]


def test_wipe_command_reaches_device_and_is_confirmed(fleet: tuple[Fleet, Store]) -> None:
    """An operator's wipe reaches the online device, which reports it done in its hello."""
    net, store = fleet
    for dev in DEVS:
        net.connect(dev)
    net.agents["van-3"].put("tasks", "x", {"route": "r1", "status": "s"})
    net.settle()
    cmd = issue_command(store, "van-3", "wipe", 0)
    net.loss = net.dup = 0.0
    for dev, payload in net.engine.tick():
        msg = codec.decode(payload, allowed=wire.DOWN_TYPES)
        assert dev == "van-3" and isinstance(msg, wire.Command) and msg.id == cmd.id
        assert not net.agents[dev].sync.command_done(msg.id)
        net.agents[dev].wipe(msg.id)
        net.up(dev, net.agents[dev].sync.hello("test/1"))
    net.flush()
    assert net.agents["van-3"].list("tasks") == []
    with store.read() as txn:
        assert [c.done_ms > 0 for c in txn.commands("van-3")] == [True]
