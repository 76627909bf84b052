"""`Batch.exhausted` and the daemon turns that skip the outbox scan because of it.

The daemon stops scanning the outbox after a batch that says `exhausted` until an event
could have made something sendable (a write's wake, a tick, any message but an ack, an
answer deadline passing). That is only sound if an exhausted batch means what it says:
the next scan with the same in-flight changes (plus the batch just sent) finds nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import Agent
from agent.daemon import AgentDaemon
from agent.sync import Batch
from schemas import codec, wire
from schemas.collection import Catalog, example_catalog_path, load_catalog
from tests.agent.agentkit import make_cfg
from waystation.config import AgentConfig

S = "route-42"
CATALOG: Catalog = load_catalog(example_catalog_path())

# Units of (priority, size, schema version): size 1 is a plain write, more a transaction.
plans = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4), st.integers(1, 2)),
                 min_size=0, max_size=10)


def _write(agent: Agent, plan: list[tuple[int, int, int]]) -> None:
    for u, (priority, size, sv) in enumerate(plan):
        if size == 1:
            agent.put("tasks", f"p-{u}", {"route": S, "notes": "x" * 40}, priority=priority)
        else:
            with agent.transaction(priority=priority) as tx:
                for i in range(size):
                    tx.put("tasks", f"t-{u}-{i}", {"route": S, "notes": "y" * 40})
        if sv == 2:  # written under another schema version: never in the same batch
            agent.sync.core.write(lambda work, u=u: _set_sv(work, u))


def _set_sv(work: Any, u: int) -> None:
    for key, entry in list(work.tx.items("outbox")):
        if entry["sv"] == 1 and entry["ch"]["k"].startswith((f"p-{u}", f"t-{u}-")):
            work.tx.put("outbox", key, {**entry, "sv": 2})


@given(plan=plans, max_changes=st.integers(1, 8), max_bytes=st.integers(300, 3000),
       txn=st.sampled_from([True, False, None]), in_flight=st.sets(st.integers(1, 30),
                                                                   max_size=4))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_an_exhausted_batch_leaves_nothing_to_send(plan: list[tuple[int, int, int]],
                                                  max_changes: int, max_bytes: int,
                                                  txn: bool | None,
                                                  in_flight: set[int]) -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        with Agent.open(make_cfg(tmp / "data"), CATALOG) as agent:
            _write(agent, plan)
            excluded = set(in_flight)
            for _ in range(40):
                batch = agent.sync.next_batch(excluded, max_changes, max_bytes, txn=txn)
                excluded |= set(batch.numbers)
                if batch.exhausted:
                    again = agent.sync.next_batch(excluded, max_changes, max_bytes, txn=txn)
                    assert again.numbers == [], (batch.numbers, again.numbers)
                    break
                if not batch:
                    break
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_batch_of_everything_pending_is_exhausted(agent: Agent) -> None:
    assert agent.sync.next_batch().exhausted  # nothing pending at all
    for i in range(3):
        agent.put("tasks", f"t-{i}", {"route": S})
    whole = agent.sync.next_batch()
    assert whole.numbers == [1, 2, 3] and whole.exhausted
    part = agent.sync.next_batch(max_changes=2)
    assert part.numbers == [1, 2] and not part.exhausted
    assert agent.sync.next_batch({1, 2, 3}).exhausted  # all in flight


def test_a_transaction_partly_in_flight_is_not_exhausted(agent: Agent) -> None:
    """Its answer makes the rest sendable: the daemon must look again after that ack."""
    with agent.transaction() as tx:
        tx.put("tasks", "o-1", {"route": S})
        tx.put("tasks", "o-2", {"route": S})
    batch = agent.sync.next_batch({1}, txn=True)
    assert batch.numbers == [] and not batch.exhausted


# ------------------------------------------------------------------ the daemon


class Engine:
    """A daemon whose engine is driven by hand; its link only collects what it sends."""

    def __init__(self, agent: Agent, cfg: AgentConfig) -> None:
        self.agent = agent
        self.daemon = AgentDaemon(cfg, CATALOG, agent=agent)
        self.sent: list[bytes] = []
        self.scans = 0
        d = self.daemon
        d.link.publish = self._publish  # type: ignore[method-assign]
        d._connected = True
        d._answered = True
        d.sync.server_caps = frozenset(d.sync.offered)
        d._wake_sock = object()  # type: ignore[assignment]  # "writes wake the daemon"
        next_batch = d.sync.next_batch

        def counting(*args: Any, **kwargs: Any) -> Batch:
            self.scans += 1
            return next_batch(*args, **kwargs)

        d.sync.next_batch = counting  # type: ignore[method-assign]

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        if isinstance(codec.decode(payload), wire.Changes):  # not hello, status...
            self.sent.append(payload)
        return True

    def turn(self, *event: Any) -> None:
        self.daemon._handle(event)
        self.daemon._pump(time.monotonic())

    def ack_last(self, q: int) -> None:
        msg = codec.decode(self.sent[-1])
        assert isinstance(msg, wire.Changes)
        ack = codec.encode_dict({"type": "ack", "v": 1,
                                 "ok": [[ch.n, S, q + i] for i, ch in enumerate(msg.ch)]})
        self.turn("msg", self.daemon.down_topic, ack)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    cfg = make_cfg(tmp_path / "data", scopes=(S,))
    with Agent.open(cfg, CATALOG) as agent:
        yield Engine(agent, cfg)


def test_after_an_ack_the_daemon_does_not_scan_an_exhausted_outbox(engine: Engine) -> None:
    engine.agent.put("tasks", "t-1", {"route": S})
    engine.turn("wake")
    assert len(engine.sent) == 1 and engine.scans == 1  # one scan: sent, and exhausted
    engine.ack_last(1)
    assert engine.scans == 1 and engine.agent.sync.pending_count() == 0
    engine.agent.put("tasks", "t-2", {"route": S})
    engine.turn("wake")  # a write's wake: looked at again, and sent
    assert len(engine.sent) == 2 and engine.scans == 2
    assert [ch.k for ch in codec.decode(engine.sent[-1]).ch] == ["t-2"]  # type: ignore[attr-defined]


def test_a_write_without_a_wake_is_sent_by_the_timers(engine: Engine) -> None:
    engine.turn("wake")
    assert engine.sent == [] and engine.scans == 1
    engine.agent.put("tasks", "t-1", {"route": S})
    engine.turn("msg", engine.daemon.down_topic, codec.encode_dict(
        {"type": "ack", "v": 1, "ok": [[99, S, 1]]}))  # (a duplicate: ignored)
    assert engine.sent == [] and engine.scans == 1  # an ack alone: no scan
    engine.daemon._timers(time.monotonic())
    engine.daemon._pump(time.monotonic())
    assert len(engine.sent) == 1


def test_an_unanswered_change_is_sent_again_after_its_deadline(engine: Engine) -> None:
    engine.agent.put("tasks", "t-1", {"route": S})
    engine.turn("wake")
    assert len(engine.sent) == 1
    later = time.monotonic() + engine.daemon.cfg.sync.ack_timeout_s + 1
    engine.daemon._pump(later)
    assert len(engine.sent) == 2 and engine.daemon.stats.resent == 1
