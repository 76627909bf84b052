"""A device transaction against a server that does not serve `txn` (a server from before
capabilities, or one whose welcome leaves it out): the changes travel as plain changes
and are answered one by one (PROTOCOL.md §7.2.1), so atomicity holds on the device only.
A real agent store and a real engine (LMDB server store), in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.api import Agent
from broker.server import caps as server_caps
from schemas import codec, wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, assert_views_consistent, make_cfg
from tests.server.helpers import T0, make_engine
from waystation import merge

D = "depot-7"


def _deliver(agent: Agent, out: list[tuple[str, bytes]]) -> list[wire.Message]:
    msgs = []
    for dev, payload in out:
        if dev != agent.device_id:
            continue
        msg = codec.decode(payload, allowed=wire.DOWN_TYPES)
        msgs.append(msg)
        if isinstance(msg, wire.Ack):
            agent.sync.apply_ack(msg)
        elif isinstance(msg, wire.Reject):
            agent.sync.apply_reject(msg)
        elif isinstance(msg, wire.Welcome):
            agent.sync.apply_welcome(msg)
    return msgs


@pytest.mark.parametrize("served", [True, False], ids=["server-with-txn", "old-server"])
def test_atomicity_on_the_wire_only_with_the_capability(
        tmp_path: Path, catalog: Catalog, served: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if not served:  # a server that serves everything but transactions
        monkeypatch.setattr(server_caps, "SERVER_CAPS", server_caps.SERVER_CAPS - {"txn"})
    engine, store, _ = make_engine(tmp_path / "server", {"van-1": [D]})
    agent = Agent.open(make_cfg(tmp_path / "dev", scopes=(D,)), catalog,
                       now_ms=FakeClock(T0 - 60_000))
    try:
        dev = agent.device_id
        _deliver(agent, engine.handle_up(dev, codec.encode(agent.sync.hello("t/1"))))
        assert agent.sync.server_caps is not None
        txn = "txn" in agent.sync.server_caps
        assert txn == served
        agent.put("inventory", "bin-a", {"depot": D, "sku": "A"})
        agent.put("inventory", "bin-b", {"depot": D, "sku": "A"})
        agent.increment("inventory", "bin-a", "stock", 3)
        with agent.transaction() as tx:  # bin-b first: the server takes it before bin-a
            tx.increment("inventory", "bin-b", "stock", 5)
            tx.increment("inventory", "bin-a", "stock", -5)   # below 0 on the server
        batch = agent.sync.next_batch(txn=txn)
        assert all(("tx" in ch) == txn for n, ch in batch if n >= 4)
        _deliver(agent, engine.handle_up(dev, batch.payload(dev)))

        letters = {d.n: d.code for d in agent.dead_letters()}
        with store.read() as st:
            raw = st.get_record("inventory", "bin-b")
        assert raw is not None
        server_b = merge.from_json(raw).value("stock") or 0
        b = agent.get("inventory", "bin-b")
        assert b is not None
        if served:
            # All or none on the server too: bin-b untouched, both rolled back.
            assert letters == {5: "rule_rejected", 4: "txn_aborted"}
            assert b.fields.get("stock", 0) == 0
        else:
            # One by one: the server applied bin-b's +5 (acked, so it stays on the
            # device too) and refused bin-a's -5; nothing of the transaction is pending.
            assert letters == {5: "rule_rejected"}
            assert b.fields["stock"] == 5
        assert server_b == (0 if served else 5)
        assert agent.pending() == []
        assert_views_consistent(agent)
    finally:
        agent.close()
        store.close()
